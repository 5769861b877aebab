"""Who may talk to a hetsched service: bind policy, CurveZMQ keys and authentication (docs/security.md).

* :func:`check_bind` refuses an endpoint reachable from other machines unless CURVE keys are
  configured (or ``insecure: true`` says the risk is accepted, which is logged loudly).
* :func:`generate_keys` writes a server and client key pairs (``hetsched keys generate DIR``).
* :class:`ServerAuth` runs a ZAP handler that admits only the client public keys in the
  ``authorized_clients`` directory, turns a socket into a CURVE server, and counts and logs every
  refused handshake (unknown key, no CURVE at all, wrong server key, garbage).
* :func:`apply_client` makes a client socket a CURVE client of a server.
* :class:`LinkKeys` and ``secure_link_*`` protect the pipeline's own links (stage to stage, worker
  to coordinator control): one ephemeral key pair per run for the binding side and one for the
  connecting side, handed to the workers in their spawn spec; :func:`start_link_authenticator`
  admits exactly the run's client key.

Nothing here reads anything from the wire except through libzmq's CURVE handshake and the ZAP
request frames, which are compared as bytes.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from hetsched.errors import ConfigError, HetschedError

log = logging.getLogger(__name__)

SERVER_NAME = "server"
AUTHORIZED_DIR = "authorized_clients"
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


def _write_private(path: str) -> None:
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)


def generate_keys(directory: str, clients: tuple[str, ...] | list[str] = ("client",),
                  overwrite: bool = False) -> dict:
    """Write a server key pair and one key pair per client name into ``directory``.

    Files: ``server.key`` (public), ``server.key_secret`` (mode 0600), ``<name>.key`` and
    ``<name>.key_secret`` (0600) per client, and a copy of each client's public key in
    ``authorized_clients/``. Secret files are created in a private temporary directory, made 0600
    and only then moved into place, so they are never readable by others. Existing key files are
    refused unless ``overwrite``. Returns the paths written.
    """
    names = [SERVER_NAME, *clients]
    for n in clients:
        if not n or n == SERVER_NAME or os.sep in n or n.startswith(".") or (os.altsep and os.altsep in n):
            raise ConfigError(f"keys: bad client name {n!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"keys: duplicate client name in {list(clients)}")
    directory = os.path.abspath(directory)
    auth_dir = os.path.join(directory, AUTHORIZED_DIR)
    targets = [os.path.join(directory, f"{n}{ext}") for n in names for ext in (".key", ".key_secret")]
    targets += [os.path.join(auth_dir, f"{n}.key") for n in clients]
    existing = [p for p in targets if os.path.exists(p)]
    if existing and not overwrite:
        raise ConfigError(f"keys: {existing[0]} already exists (use a new directory, or overwrite)")
    created = not os.path.isdir(directory)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if created:
        os.chmod(directory, 0o700)
    os.makedirs(auth_dir, mode=0o755, exist_ok=True)
    out: dict = {"directory": directory, "authorized_clients": auth_dir, "clients": {}}
    tmp = tempfile.mkdtemp(prefix=".keys-", dir=directory)  # mode 0700
    try:
        for n in names:
            pub, sec = zmq.auth.create_certificates(tmp, n)
            _write_private(sec)
            os.chmod(pub, 0o644)
            dst_pub, dst_sec = os.path.join(directory, f"{n}.key"), os.path.join(directory, f"{n}.key_secret")
            os.replace(sec, dst_sec)
            os.replace(pub, dst_pub)
            if n == SERVER_NAME:
                out["server_public"], out["server_secret"] = dst_pub, dst_sec
            else:
                allowed = os.path.join(auth_dir, f"{n}.key")
                shutil.copyfile(dst_pub, allowed)
                os.chmod(allowed, 0o644)
                out["clients"][n] = {"public": dst_pub, "secret": dst_sec, "authorized": allowed}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_z85_key(value: str) -> bool:
    if len(value) != 40:
        return False
    try:
        return len(z85.decode(value.encode("ascii"))) == 32
    except (ValueError, UnicodeEncodeError, KeyError, IndexError):
        return False


def load_public_key(value: str, what: str) -> bytes:
    """A Z85 public key from a ``.key``/``.key_secret`` file, or a 40-character Z85 string."""
    if os.path.isfile(value):
        try:
            public, _ = zmq.auth.load_certificate(value)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{what}: cannot read a public key from {value}: {exc}") from None
        if not _is_z85_key(public.decode("ascii", "replace")):
            raise ConfigError(f"{what}: {value} does not hold a valid CURVE public key")
        return public
    if _is_z85_key(value):
        return value.encode("ascii")
    raise ConfigError(f"{what}: {value} is neither a key file nor a 40-character Z85 public key")


def load_secret_key(path: str, what: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``.key_secret`` file; warns if others may read it."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: secret key file not found: {path}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc}") from None
    if secret is None:
        raise ConfigError(f"{what}: {path} holds no secret key (give the .key_secret file, not the .key file)")
    if not (_is_z85_key(public.decode("ascii", "replace")) and _is_z85_key(secret.decode("ascii", "replace"))):
        raise ConfigError(f"{what}: {path} does not hold a valid CURVE key pair")
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: %s is accessible by other users (mode %o); run: chmod 600 %s",
                    what, path, stat.S_IMODE(mode), path)
    return public, secret


# ---------------------------------------------------------------------------------------------
# bind policy


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


def check_link_bind(endpoint: str, link_keys: "LinkKeys | None", what: str = "transport.host") -> None:
    """The pipeline's own links: a non-loopback tcp:// bind needs the run's link keys."""
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


def _zap_safe_rcvhwm(sock: zmq.Socket) -> None:
    """libzmq 4.3 delivers nothing to a CURVE server socket with a ZAP handler whose RCVHWM is 1
    (poll reports input, recv never gets it); 2 works. tests/test_security.py checks both."""
    if sock.getsockopt(zmq.RCVHWM) == 1:
        sock.setsockopt(zmq.RCVHWM, 2)


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
