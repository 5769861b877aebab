"""Keys and authentication of the pipeline's own links (stage to stage, worker to coordinator over
tcp://): one ephemeral CURVE key pair per run for the binding side and one for the connecting side,
handed to the workers in their spec; only the run's client key is admitted."""

from __future__ import annotations

from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator

from hetsched.errors import HetschedError
from hetsched.wire.keys import _is_z85_key
from hetsched.wire.security import LINK_DOMAIN, RejectionLog, _CountingAuthenticator, _KeySet, _zap_safe_rcvhwm


@dataclass(frozen=True)
class LinkKeys:
    """Ephemeral CURVE keys of one pipeline run (Z85 strings): every binding link socket uses the
    server pair, every connecting one the client pair, and only the client public key is admitted.
    Made by the coordinator, given to workers in their spawn spec (a local pipe), never written."""

    server_public: str
    server_secret: str
    client_public: str
    client_secret: str

    @classmethod
    def generate(cls) -> "LinkKeys":
        sp, ss = zmq.curve_keypair()
        cp, cs = zmq.curve_keypair()
        return cls(sp.decode(), ss.decode(), cp.decode(), cs.decode())

    def to_dict(self) -> dict:
        return {"server_public": self.server_public, "server_secret": self.server_secret,
                "client_public": self.client_public, "client_secret": self.client_secret}

    @classmethod
    def from_dict(cls, d: dict | None) -> "LinkKeys | None":
        if not d:
            return None
        keys = cls(**{k: str(d[k]) for k in ("server_public", "server_secret", "client_public", "client_secret")})
        for name, value in keys.to_dict().items():
            if not _is_z85_key(value):
                raise HetschedError(f"link keys: {name} is not a Z85 CURVE key")
        return keys

    def __repr__(self) -> str:  # never print the secrets
        return f"LinkKeys(server_public={self.server_public!r}, client_public={self.client_public!r})"



def secure_link_server(sock: zmq.Socket, link_keys: LinkKeys | None) -> None:
    """A binding link socket (worker input, coordinator control and results): CURVE server.
    Call after setting RCVHWM (an RCVHWM of 1 is raised to 2, see ``_zap_safe_rcvhwm``)."""
    if link_keys is None:
        return
    _zap_safe_rcvhwm(sock)
    sock.curve_server = True
    sock.curve_secretkey = link_keys.server_secret.encode()
    sock.curve_publickey = link_keys.server_public.encode()
    sock.zap_domain = LINK_DOMAIN.encode()


def secure_link_client(sock: zmq.Socket, link_keys: LinkKeys | None) -> None:
    """A connecting link socket (coordinator feed, worker output and control): CURVE client."""
    if link_keys is None:
        return
    sock.curve_serverkey = link_keys.server_public.encode()
    sock.curve_publickey = link_keys.client_public.encode()
    sock.curve_secretkey = link_keys.client_secret.encode()


def start_link_authenticator(ctx: zmq.Context, link_keys: LinkKeys | None,
                             what: str = "pipeline link") -> ThreadAuthenticator | None:
    """A ZAP handler in ``ctx`` that admits exactly the run's link client key (None without keys).
    Start it before binding a secured link socket; call ``.stop()`` on it before ``ctx.term()``.
    Refusals are logged (with the peer's address) and counted in ``.denied``."""
    if link_keys is None:
        return None
    auth = _CountingAuthenticator(ctx, RejectionLog(), what)
    auth.start()
    auth.configure_curve_callback(LINK_DOMAIN, _KeySet({link_keys.client_public.encode()}))
    return auth
