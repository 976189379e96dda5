"""CURVE authentication for a service reachable from the network: ``stemlive keys`` and the socket set-up.

A service that binds a non-loopback interface (``--allow-remote``) must be given keys (``--keys DIR``): its
sockets then speak ZeroMQ CURVE (encrypted, authenticated with Curve25519) and a ZAP authenticator admits only
clients whose public key is in ``DIR/authorized_clients``. Peers without an admitted key are dropped in the
handshake, before any message reaches the service.

``stemlive keys DIR`` writes, with :func:`zmq.auth.create_certificates`::

    DIR/server.key, DIR/server.key_secret          the service's key pair (keep the secret on the server)
    DIR/client.key, DIR/client.key_secret          a client key pair (copy both, with server.key, to clients)
    DIR/authorized_clients/client.key              public keys the service admits (add more for more clients)

Clients (acquisition, viewer, Swift plug-in) use :meth:`Curve.client` with a folder holding ``server.key`` and
their ``client.key_secret``.
"""

from __future__ import annotations

import argparse
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stemlive.live.exitcodes import CLIError, ExitCode

if TYPE_CHECKING:  # zmq is imported where keys are used: `stemlive` builds its parser from this module
    import zmq

AUTHORIZED = "authorized_clients"


def create_keys(folder: str | Path, client_name: str = "client") -> Path:
    """Create a server key pair, a client key pair and the admitted-clients folder in ``folder``.

    Existing keys are never overwritten (:class:`FileExistsError`).
    """
    import zmq.auth

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("server", client_name):
        if (folder / f"{name}.key_secret").exists():
            raise FileExistsError(f"{folder / (name + '.key_secret')} exists; refusing to overwrite keys")
    server_public, server_secret = zmq.auth.create_certificates(folder, "server")
    client_public, client_secret = zmq.auth.create_certificates(folder, client_name)
    for secret in (server_secret, client_secret):
        Path(secret).chmod(0o600)
    authorized = folder / AUTHORIZED
    authorized.mkdir(exist_ok=True)
    shutil.copy(client_public, authorized / Path(client_public).name)
    return folder


def _load(path: Path) -> tuple[bytes, bytes | None]:
    import zmq
    import zmq.auth

    if not zmq.has("curve"):
        raise ValueError("this libzmq was built without CURVE support: reinstall pyzmq from its wheels")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such key file (create keys with `stemlive keys DIR`)")
    public, secret = zmq.auth.load_certificate(path)
    return public, secret


_authenticators: dict[int, Any] = {}  # context id -> zmq.auth.thread.ThreadAuthenticator
_auth_lock = threading.Lock()


@dataclass
class Curve:
    """Keys for one side of CURVE; pass it as ``curve=`` to the transport classes and the service.

    Use :meth:`server` or :meth:`client`; ``apply_server``/``apply_client`` configure a socket before it binds
    or connects.
    """

    public: bytes
    secret: bytes
    server_public: bytes | None = None
    authorized: Path | None = None
    _contexts: set[int] = field(default_factory=set)

    @classmethod
    def server(cls, folder: str | Path) -> Curve:
        """The service's keys from ``folder`` (``server.key_secret``, ``authorized_clients/``)."""
        folder = Path(folder)
        public, secret = _load(folder / "server.key_secret")
        authorized = folder / AUTHORIZED
        if secret is None or not authorized.is_dir() or not any(authorized.glob("*.key")):
            raise FileNotFoundError(f"{folder}: needs server.key_secret and at least one public key in {authorized}")
        return cls(public, secret, authorized=authorized)

    @classmethod
    def client(cls, folder: str | Path, name: str = "client") -> Curve:
        """A client's keys from ``folder`` (``<name>.key_secret`` and the service's ``server.key``)."""
        folder = Path(folder)
        public, secret = _load(folder / f"{name}.key_secret")
        server_public, _ = _load(folder / "server.key")
        if secret is None:
            raise FileNotFoundError(f"{folder / (name + '.key_secret')} holds no secret key")
        return cls(public, secret, server_public=server_public)

    def apply_server(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE server that admits only the authorised client keys (call before bind)."""
        if self.authorized is None:
            raise ValueError("client keys cannot configure a server socket")
        _start_authenticator(sock.context, self.authorized)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def apply_client(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE client of the server whose public key this holds (call before connect)."""
        if self.server_public is None:
            raise ValueError("server keys cannot configure a client socket")
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public


def _start_authenticator(context: zmq.Context[Any], authorized: Path) -> None:
    """One ZAP authenticator per context, admitting the public keys in ``authorized`` (any client address)."""
    from zmq.auth.thread import ThreadAuthenticator

    with _auth_lock:
        auth = _authenticators.get(id(context))
        if auth is None:
            auth = ThreadAuthenticator(context)
            auth.start()
            _authenticators[id(context)] = auth
        auth.configure_curve(domain="*", location=str(authorized))


def cmd_keys(args: argparse.Namespace) -> int:
    try:
        folder = create_keys(args.folder)
    except FileExistsError as e:
        raise CLIError(str(e), ExitCode.USAGE) from e
    print(f"stemlive keys: wrote server and client key pairs to {folder.resolve()}; run "
          f"`stemlive serve --allow-remote --keys {folder}` and give clients server.key, client.key and "
          "client.key_secret", flush=True)
    return 0


def add_subcommand(sub: Any) -> None:
    """Register ``stemlive keys``."""
    p = sub.add_parser("keys", help="create CURVE key pairs for a service reachable from the network")
    p.add_argument("folder", type=Path, help="folder for the keys (created; existing keys are not overwritten)")
    p.set_defaults(func=cmd_keys)
