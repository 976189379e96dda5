#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3.11 + pip + gcc): builds ./.venv on first use, then runs
#   bash bootstrap.sh demo [ARGS]   the main job: `stemlive demo` on the simulated instrument
#   bash bootstrap.sh test [ARGS]   the test suite (what CI runs)
#   bash bootstrap.sh stemlive ...  any stemlive subcommand; bash bootstrap.sh shell: a shell in the venv
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
venv="${STEMLIVE_VENV:-$here/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

stamp="$venv/.stemlive-installed"
if [ ! -x "$venv/bin/python" ]; then
    echo "[bootstrap] creating virtual environment in $venv" >&2
    "$python" -m venv "$venv"
fi
# Editable install in setuptools' strict mode: a tree of links to the checkout's files (build/__editable__.*) on
# sys.path. Unlike the default (an import hook), it is a real folder, so Nion Swift -- which lists the folders of
# the nionswift_plugin namespace package -- finds the plug-in in a plain `nionswift`, and edits to existing files
# take effect at once. New or removed source files need the link tree rebuilt: the list of files is part of the stamp.
sources="$(find . \( -name .git -o -name .venv -o -path "$venv" -o -name build -o -name tests -o -name docs \
                  -o -name benchmarks -o -name scripts -o -name __pycache__ \) -prune \
                -o -type f \( -name '*.py' -o -name '*.json' \) -print | LC_ALL=C sort | cksum)"
log="$venv/install.log"
install_failed() {
    tail -n 60 "$log" >&2
    echo "[bootstrap] installation failed; the whole log is in $log" >&2
    exit 1
}
# Reinstall when the package metadata changed since the last install.
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[bootstrap] installing stemlive and its dependencies (first run takes a few minutes)" >&2
    if ! { "$venv/bin/python" -m pip install --upgrade pip \
            && "$venv/bin/python" -m pip install -e ".[test]" --config-settings editable_mode=strict; } \
            >"$log" 2>&1; then
        install_failed
    fi
    echo "$sources" >"$stamp"
elif [ "$(cat "$stamp")" != "$sources" ]; then
    echo "[bootstrap] source files added or removed: refreshing the editable install's link tree" >&2
    "$venv/bin/python" -m pip install --no-deps -e . --config-settings editable_mode=strict >"$log" 2>&1 \
        || install_failed
    echo "$sources" >"$stamp"
fi
export PATH="$venv/bin:$PATH"

# Qt needs a few X libraries (and Xvfb + xwininfo for the GUI tests); install them where we can (root, apt).
x11_libraries="libxcb-cursor.so.0 libxkbcommon-x11.so.0 libxcb-icccm.so.4 libxcb-keysyms.so.1 libxcb-image.so.0
               libxcb-render-util.so.0 libEGL.so.1 libGL.so.1 libfontconfig.so.1 libdbus-1.so.3"
# Prints what is missing, one a line. The linker cache is read once into a variable: `ldconfig -p | grep -q` under
# pipefail failed at random (grep exits at the first match, ldconfig then dies of SIGPIPE, the pipeline fails),
# so every run asked apt again. A library the cache does not list (installed, cache not rebuilt) is looked for
# in the usual library folders.
x11_missing() {
    local cache lib dir found
    cache="$(ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true)"
    command -v Xvfb >/dev/null 2>&1 || echo xvfb
    command -v xwininfo >/dev/null 2>&1 || echo x11-utils
    for lib in $x11_libraries; do
        [[ "$cache" == *[[:space:]]"$lib "* ]] && continue
        found=""
        for dir in /usr/lib/*-linux-gnu /lib/*-linux-gnu /usr/lib64 /lib64 /usr/lib /lib /usr/local/lib; do
            [ -e "$dir/$lib" ] && { found=1; break; }
        done
        [ -n "$found" ] || echo "$lib"
    done
}
ensure_x11() {
    local missing=()
    mapfile -t missing < <(x11_missing)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[bootstrap] installing X11 libraries for Qt: ${missing[*]}" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            xvfb xauth x11-utils libxcb-cursor0 libxkbcommon-x11-0 libegl1 libgl1 libfontconfig1 libdbus-1-3 \
            libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 \
            libxcb-xinerama0 libxcb-xkb1 fonts-dejavu-core >/dev/null) \
            || echo "[bootstrap] could not install X11 libraries; GUI tests will be skipped" >&2
    else
        echo "[bootstrap] missing for the GUI tests: ${missing[*]} (not root: GUI tests will be skipped)" >&2
    fi
}

cmd="${1:-help}"
[ $# -gt 0 ] && shift
case "$cmd" in
    demo) exec stemlive demo "$@" ;;
    test)
        ensure_x11
        exec python -m pytest -q -p no:cacheprovider "$@" ;;
    stemlive) exec stemlive "$@" ;;
    shell) exec bash ;;
    *) echo "usage: bash bootstrap.sh demo|test|stemlive ARGS|shell" >&2; exit 2 ;;
esac
