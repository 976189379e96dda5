"""ZeroMQ endpoints and socket security shared by the lossless path and the result stream.

Default endpoints bind loopback only (:func:`check_bind_endpoint`); :func:`secure_server` and
:func:`secure_client` apply CURVE keys (:class:`stemlive.live.wire.keys.Curve`) to a socket when given.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import zmq

log = logging.getLogger(__name__)

DEFAULT_FRAME_ENDPOINT = "tcp://127.0.0.1:7710"
DEFAULT_RESULT_ENDPOINT = "tcp://127.0.0.1:7711"


class TransportError(RuntimeError):
    """The lossless path cannot make progress: blocked send, dead or non-acknowledging service."""


def sibling_endpoint(endpoint: str) -> str:
    """A free endpoint next to ``endpoint``: same host on another (ephemeral) port, or a suffixed ipc/inproc name."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "tcp":
        return f"tcp://{rest.rpartition(':')[0]}:*"
    return f"{endpoint}-requests"


def reachable(advertised: str, connected: str) -> str:
    """The request endpoint a result advertises, with a wildcard host replaced by the host this side connected to."""
    scheme, _, rest = advertised.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme == "tcp" and host in ("0.0.0.0", "*", "[::]", "::"):
        return f"tcp://{connected.partition('://')[2].rpartition(':')[0]}:{port}"
    return advertised


def secure_server(sock: zmq.Socket[Any], curve: Any) -> None:
    if curve is not None:
        curve.apply_server(sock)


def secure_client(sock: zmq.Socket[Any], curve: Any) -> None:
    """Apply client keys: ``curve``, or else those in the folder named by ``$STEMLIVE_KEYS`` (if set)."""
    if curve is None:
        curve = client_keys_from_environment()
    if curve is not None:
        curve.apply_client(sock)


#: Environment variable naming a folder with ``server.key`` and ``client.key_secret``: every stemlive client
#: (acquisition, Swift plug-in, viewer, replay) then speaks CURVE to the service.
KEYS_ENV = "STEMLIVE_KEYS"


def client_keys_from_environment() -> Any:
    """:class:`stemlive.live.wire.keys.Curve` client keys from ``$STEMLIVE_KEYS``, or None when it is not set."""
    import os

    folder = os.environ.get(KEYS_ENV)
    if not folder:
        return None
    from stemlive.live.wire.keys import Curve

    return Curve.client(folder)


def is_loopback(endpoint: str) -> bool:
    """Whether binding ``endpoint`` stays on this computer (loopback tcp, ipc, inproc)."""
    try:
        check_bind_endpoint(endpoint, allow_remote=False)
    except ValueError:
        return False
    return True


def check_bind_endpoint(endpoint: str, allow_remote: bool) -> str:
    """Refuse to bind anything but loopback unless ``allow_remote`` is set.

    Parameters
    ----------
    endpoint : str
        ``tcp://host:port`` (port may be ``*`` for an ephemeral port), ``ipc://path`` or ``inproc://name``.
    allow_remote : bool
        Allow a non-loopback interface (logged as a warning).

    Returns
    -------
    str
        The endpoint to bind (``localhost`` becomes ``127.0.0.1``, which libzmq can bind).

    Raises
    ------
    ValueError
        For a non-loopback interface without ``allow_remote``, or an unsupported or malformed endpoint.
    """
    scheme, sep, rest = endpoint.partition("://")
    if not sep or not rest:
        raise ValueError(f"malformed endpoint {endpoint!r}: expected tcp://host:port, ipc://path or inproc://name")
    if scheme in ("ipc", "inproc"):
        return endpoint
    if scheme != "tcp":
        raise ValueError(f"unsupported transport {scheme!r} in {endpoint!r}: use tcp, ipc or inproc")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not (port in ("*", "!") or (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"malformed tcp endpoint {endpoint!r}: expected tcp://host:port")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare == "localhost":
        return f"tcp://127.0.0.1:{port}"
    try:
        loopback = ipaddress.ip_address(bare).is_loopback
    except ValueError:
        loopback = False  # '*', an interface name or a host name: not provably loopback
    if loopback:
        return endpoint
    if not allow_remote:
        raise ValueError(
            f"refusing to bind {endpoint!r}: {host!r} is not a loopback address, so other computers could send to "
            "or read from it. Bind 127.0.0.1 or pass allow_remote=True (--allow-remote) to accept remote peers."
        )
    log.warning("binding %s on non-loopback interface %r: reachable from the network", endpoint, host)
    return endpoint
