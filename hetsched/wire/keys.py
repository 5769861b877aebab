"""CurveZMQ key files: ``hetsched keys generate DIR`` writes them, the service and clients load and
check them (docs/security.md, "Setting up keys")."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile

import zmq
import zmq.auth
from zmq.utils import z85

from hetsched.errors import ConfigError

log = logging.getLogger(__name__)

SERVER_NAME = "server"
AUTHORIZED_DIR = "authorized_clients"


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
