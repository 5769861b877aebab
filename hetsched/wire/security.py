"""Who may talk to a hetsched service: bind policy, CurveZMQ keys and authentication (docs/security.md).

* :func:`check_bind` refuses an endpoint reachable from other machines unless CURVE keys are
  configured (or ``insecure: true`` says the risk is accepted, which is logged loudly).
* key files (``hetsched keys generate DIR``, loading and checking them) are ``hetsched.wire.keys``.
* :class:`ServerAuth` runs a ZAP handler that admits only the client public keys in the
  ``authorized_clients`` directory, turns a socket into a CURVE server, and counts and logs every
  refused handshake (unknown key, no CURVE at all, wrong server key, garbage).
* :func:`apply_client` makes a client socket a CURVE client of a server.
* the pipeline's own links (stage to stage, worker to coordinator control) are protected by
  ``hetsched.wire.links`` with the authenticator and the rejection log defined here.

Nothing here reads anything from the wire except through libzmq's CURVE handshake and the ZAP
request frames, which are compared as bytes.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from hetsched.errors import ConfigError, HetschedError
from hetsched.wire.keys import load_public_key, load_secret_key

log = logging.getLogger(__name__)

LINK_DOMAIN = "hetsched-link"
REJECT_LOG_INTERVAL_S = 10.0   # a peer that keeps retrying is logged at most this often
_MAX_TRACKED_PEERS = 1024      # bound on the per-peer log state an attacker could grow
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


# ---------------------------------------------------------------------------------------------
# settings and keys


@dataclass(frozen=True)
class SecuritySettings:
    """CURVE settings. Server side: ``server_secret_key`` (a ``.key_secret`` file) and
    ``authorized_clients`` (a directory of client ``*.key`` public key files). Client side:
    ``client_secret_key`` (a ``.key_secret`` file) and ``server_public_key`` (the server's ``.key``
    file, or its 40-character Z85 public key). ``insecure``: allow a non-loopback bind without keys."""

    server_secret_key: str | None = None
    authorized_clients: str | None = None
    client_secret_key: str | None = None
    server_public_key: str | None = None
    insecure: bool = False

    @property
    def server_enabled(self) -> bool:
        return bool(self.server_secret_key or self.authorized_clients)

    @property
    def client_enabled(self) -> bool:
        return bool(self.client_secret_key or self.server_public_key)

    @property
    def enabled(self) -> bool:
        """Some CURVE key is configured (the server or the client side)."""
        return self.server_enabled or self.client_enabled

    @classmethod
    def from_config(cls, sec: Any) -> "SecuritySettings":
        """From ``hetsched.config.SecurityConfig`` (paths already made absolute by the loader)."""
        if sec is None:
            return cls()
        return cls(server_secret_key=sec.server_secret_key, authorized_clients=sec.authorized_clients,
                   insecure=bool(sec.insecure))


def endpoint_host(endpoint: str) -> tuple[str, str | None]:
    """(transport, host) of a ZeroMQ endpoint; host None for ipc/inproc."""
    if "://" not in endpoint:
        raise ConfigError(f"{endpoint!r} is not a ZeroMQ endpoint (tcp://HOST:PORT or ipc:///path)")
    scheme, rest = endpoint.split("://", 1)
    scheme = scheme.lower()
    if scheme in ("ipc", "inproc"):
        return scheme, None
    if scheme not in ("tcp", "ws", "wss"):
        raise ConfigError(f"{endpoint}: transport {scheme}:// is not supported (use tcp:// or ipc://)")
    netloc = rest.split("/", 1)[0]
    if ";" in netloc:  # tcp://source;dest is a connect form; the bind side is the part after ';'
        netloc = netloc.rsplit(";", 1)[1]
    if netloc.startswith("["):
        host = netloc[1:netloc.find("]")] if "]" in netloc else netloc[1:]
    else:
        host = netloc.rsplit(":", 1)[0] if ":" in netloc else netloc
    return scheme, host


def uses_curve(endpoint: str, settings: SecuritySettings | None) -> bool:
    """CURVE protects network endpoints (tcp://, ws://) of a server with keys. ipc:// and inproc://
    stay local and rely on file permissions, so a private ipc socket (``hetsched demo``) needs no keys."""
    if settings is None or not settings.server_enabled:
        return False
    return endpoint_host(endpoint)[1] is not None


def is_loopback_host(host: str) -> bool:
    h = host.strip().lower()
    if h == "localhost":
        return True
    h = h.split("%", 1)[0]  # IPv6 zone id
    try:
        addr = ipaddress.ip_address(h)
    except ValueError:
        return False  # '*', an interface name or a host name: not known to be loopback
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def check_bind(endpoint: str, settings: SecuritySettings | None = None, what: str = "server.bind") -> None:
    """Refuse to bind ``endpoint`` where other machines can reach it unless CURVE is configured.

    ipc:// and inproc:// are local. tcp:// to 127.0.0.0/8, ::1 or localhost is local. Anything
    else (0.0.0.0, *, ::, a LAN address, an interface or host name) needs server keys, or
    ``insecure: true`` (accepted with a loud warning). Raises ConfigError.
    """
    settings = settings or SecuritySettings()
    _, host = endpoint_host(endpoint)
    if host is None or is_loopback_host(host):
        return
    if settings.server_enabled:
        return
    if settings.insecure:
        log.warning("SECURITY: %s %s is reachable from other machines and has NO authentication or "
                    "encryption (security.insecure: true). Anyone who can reach it can send frames and "
                    "read results. Configure CURVE keys instead: see docs/security.md", what, endpoint)
        return
    raise ConfigError(
        f"{what}: refusing to bind {endpoint}: {host!r} is reachable from other machines and no security is "
        "configured. Either set security.server_secret_key and security.authorized_clients (make keys with "
        "'hetsched keys generate DIR'; see docs/security.md), or bind to 127.0.0.1 or an ipc:// path, or "
        "set security.insecure: true to accept that anyone on the network can use the service")


def check_link_bind(endpoint: str, link_keys: Any, what: str = "transport.host") -> None:
    """The pipeline's own links: a non-loopback tcp:// bind needs the run's link keys
    (``hetsched.wire.links.LinkKeys``)."""
    if link_keys is None:
        check_bind(endpoint, SecuritySettings(), what)


# ---------------------------------------------------------------------------------------------
# rejection accounting


class RejectionLog:
    """Counts refused handshakes; logs the first per (reason, peer), then at most one line every 10 s.
    Called from the ZAP thread and the monitor thread, hence the lock. Memory is bounded."""

    def __init__(self, logger: logging.Logger = log, interval: float = REJECT_LOG_INTERVAL_S):
        self.log, self.interval = logger, interval
        self._lock = threading.Lock()
        self.total = 0
        self.by_reason: dict[str, int] = {}
        self._peers: dict[str, list] = {}  # "reason peer" -> [last logged time, suppressed count]

    def note(self, reason: str, peer: str, detail: str) -> None:
        now = time.monotonic()
        key = f"{reason} {peer}"
        with self._lock:
            self.total += 1
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
            st = self._peers.get(key)
            if st is not None and now - st[0] < self.interval:
                st[1] += 1
                return
            suppressed = st[1] if st is not None else 0
            if st is None and len(self._peers) >= _MAX_TRACKED_PEERS:
                self._peers.pop(next(iter(self._peers)))
            self._peers[key] = [now, 0]
        more = f" ({suppressed} more like it since the last report)" if suppressed else ""
        self.log.warning("SECURITY: refused a connection %s: %s%s", peer, detail, more)


class _CountingAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler thread that also reports every denied request (with the peer address)."""

    def __init__(self, context: zmq.Context, rejections: RejectionLog, what: str):
        super().__init__(context, log=logging.getLogger("hetsched.wire.security.zap"))
        self.rejections, self.what = rejections, what
        self.denied = 0
        self._current: tuple[str, str, str] | None = None

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        try:
            address = msg[3].decode("utf-8", "replace")[:64] if len(msg) > 3 else "?"
            mechanism = msg[5].decode("ascii", "replace")[:16] if len(msg) > 5 else "?"
            key = z85.encode(msg[6]).decode("ascii") if len(msg) > 6 and len(msg[6]) == 32 else ""
        except Exception:  # noqa: BLE001 - never let a malformed ZAP request kill the handler
            address, mechanism, key = "?", "?", ""
        self._current = (address, mechanism, key)
        try:
            await super().handle_zap_message(msg)
        finally:
            self._current = None

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        if status_code != b"200":
            self.denied += 1
            address, mechanism, key = self._current or ("?", "?", "")
            who = f"from {address}" if address else "from an unknown address"
            what = f"client key {key}" if key else f"{mechanism} client"
            self.rejections.note("unauthorized_key", f"{who} on {self.what}",
                                 f"{what} is not authorized ({status_text.decode('ascii', 'replace')})")
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


class _KeySet:
    """CURVE credentials provider for pyzmq's authenticator: a fixed set of Z85 public keys."""

    def __init__(self, keys: set[bytes]):
        self.keys = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


_PROTOCOL_DETAIL = {
    getattr(zmq, "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", -1):
        ("no_curve", "the peer does not speak CURVE (a client without keys?)"),
    getattr(zmq, "PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC", -2):
        ("bad_crypto", "CURVE handshake did not decrypt (the client uses a wrong server public key?)"),
}


class _HandshakeMonitor:
    """Reads a socket's monitor events in a thread and counts failed handshakes."""

    def __init__(self, sock: zmq.Socket, rejections: RejectionLog, what: str):
        self.sock, self.rejections, self.what = sock, rejections, what
        self.failed = 0
        self._stop = threading.Event()
        self._mon = sock.get_monitor_socket(_HANDSHAKE_FAILED)
        self._thread = threading.Thread(target=self._run, name="hetsched-handshake-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from zmq.utils.monitor import recv_monitor_message
        mon = self._mon
        while not self._stop.is_set():
            try:
                if not mon.poll(100):
                    continue
                ev = recv_monitor_message(mon, flags=zmq.NOBLOCK)
            except zmq.Again:
                continue
            except zmq.ZMQError:
                return  # socket closed under us
            event, value = int(ev["event"]), int(ev["value"])
            if event == zmq.EVENT_MONITOR_STOPPED:
                return
            if not event & _HANDSHAKE_FAILED:
                continue
            self.failed += 1
            endpoint = ev.get("endpoint", b"").decode("utf-8", "replace")
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                continue  # the ZAP handler already logged it, with the peer's address and key
            if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and 0 < value < 4096:  # the value is an errno
                reason, detail = "handshake", (f"handshake failed ({os.strerror(value)}: the peer closed or broke "
                                               "the connection during the handshake)")
            else:
                reason, detail = _PROTOCOL_DETAIL.get(value, ("handshake", f"handshake failed (code {value:#x})"))
            self.rejections.note(reason, f"on {self.what} {endpoint}", detail)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._mon.close(linger=0)


class ServerAuth:
    """CURVE server authentication for one context: a ZAP handler admitting the public keys in
    ``settings.authorized_clients``. ``apply(sock)`` before ``bind``; ``watch(sock)`` after it to
    count failed handshakes. ``rejected``: refused handshakes so far. ``close()`` stops it all."""

    def __init__(self, context: zmq.Context, settings: SecuritySettings, what: str = "server.bind"):
        if not settings.server_secret_key:
            raise ConfigError("security.server_secret_key: missing (needed with security.authorized_clients)")
        if not settings.authorized_clients:
            raise ConfigError("security.authorized_clients: missing (a directory of client public *.key files; "
                              "needed with security.server_secret_key)")
        self.public, self.secret = load_secret_key(settings.server_secret_key, "security.server_secret_key")
        self.directory = settings.authorized_clients
        self.keys = self._load_authorized(self.directory)
        self.what = what
        self.rejections = RejectionLog()
        self._monitors: list[_HandshakeMonitor] = []
        self.auth = _CountingAuthenticator(context, self.rejections, what)
        try:
            self.auth.start()
        except zmq.ZMQError as exc:
            raise HetschedError(f"cannot start the ZAP authenticator on this context ({exc}); a context holds "
                                "one ZAP handler: give the server a context of its own") from None
        self.auth.configure_curve_callback("*", _KeySet(self.keys))
        log.info("CURVE on %s: %d authorized client key(s) from %s", what, len(self.keys), self.directory)

    @staticmethod
    def _load_authorized(directory: str) -> set[bytes]:
        if not os.path.isdir(directory):
            raise ConfigError(f"security.authorized_clients: not a directory: {directory}")
        keys: set[bytes] = set()
        for name in sorted(os.listdir(directory)):
            if name.endswith(".key"):
                keys.add(load_public_key(os.path.join(directory, name), f"security.authorized_clients ({name})"))
        if not keys:
            log.warning("security.authorized_clients: %s holds no *.key files: every client will be refused",
                        directory)
        return keys

    def reload(self) -> int:
        """Re-read the authorized keys directory (e.g. after adding a client); returns the count."""
        self.keys = self._load_authorized(self.directory)
        self.auth.configure_curve_callback("*", _KeySet(self.keys))
        return len(self.keys)

    def apply(self, sock: zmq.Socket) -> None:
        _zap_safe_rcvhwm(sock)
        sock.curve_server = True
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public

    def watch(self, sock: zmq.Socket) -> None:
        self._monitors.append(_HandshakeMonitor(sock, self.rejections, self.what))

    @property
    def denied(self) -> int:
        """Handshakes the ZAP handler refused (a CURVE client whose key is not authorized)."""
        return self.auth.denied

    @property
    def rejected(self) -> int:
        """Handshakes refused: unauthorized keys, clients without CURVE, wrong server key, garbage.
        The monitors see every failure (the ZAP ones included, a moment after the handler's count)."""
        return max(sum(m.failed for m in self._monitors), self.auth.denied)

    def close(self) -> None:
        for m in self._monitors:
            m.close()
        self._monitors.clear()
        if self.auth.is_alive() or self.auth.pipe is not None:
            self.auth.stop()


def apply_client(sock: zmq.Socket, settings: SecuritySettings | None) -> bool:
    """Make ``sock`` a CURVE client (call before connect). Returns False if no client keys are set."""
    if settings is None or not settings.client_enabled:
        return False
    if not settings.server_public_key:
        raise ConfigError("--server-key: the server's public key (server.key) is needed with a client key")
    if not settings.client_secret_key:
        raise ConfigError("--client-key: this client's secret key file (NAME.key_secret) is needed with a "
                          "server key")
    server_pub = load_public_key(settings.server_public_key, "--server-key")
    public, secret = load_secret_key(settings.client_secret_key, "--client-key")
    sock.curve_serverkey = server_pub
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    return True


# ---------------------------------------------------------------------------------------------
# the pipeline's own links


def _zap_safe_rcvhwm(sock: zmq.Socket) -> None:
    """libzmq 4.3 delivers nothing to a CURVE server socket with a ZAP handler whose RCVHWM is 1
    (poll reports input, recv never gets it); 2 works. tests/test_security.py checks both."""
    if sock.getsockopt(zmq.RCVHWM) == 1:
        sock.setsockopt(zmq.RCVHWM, 2)
