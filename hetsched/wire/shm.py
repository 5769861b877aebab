"""Shared-memory input slots for clients on the same host (the zero-copy input path).

A local client creates a file under /dev/shm (mode 0600: only the same user can map it), sized for
``slots`` model inputs, and registers it with the service. It then writes a frame into a free
slot and submits only a small header naming the slot. The coordinator keeps the reference (so it
can replay the frame) and stage 0 reads the tensor straight from the file: the 600 KB input of
SqueezeNet is never copied through a socket. A slot is free again once its frame's reply arrived.

The file is the client's, so the service treats it as hostile (docs/security.md, "Shared memory"):
it is opened without blocking and without following links, must be a regular file of the service's
own user with no group/other access and exactly the registered size, and is mapped read-only. The
descriptor stays open for the region's lifetime: ``check_size`` (fstat) tells whether the file was
truncated under the mapping, where touching it would kill the process with SIGBUS, and ``read``
copies a slot with pread, which a truncation can only make short (BAD_SHM), never fatal. Workers
keep a bounded cache of regions (``RegionCache``) that notices replaced and removed files.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import secrets
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from hetsched.errors import ProtocolError
from hetsched.wire.dtypes import ITEMSIZE

SHM_DIR = "/dev/shm"
NAME_RE = re.compile(r"^hetsched-[A-Za-z0-9_-]{1,64}$")
MAX_REGION_BYTES = 1 << 30
MAX_SLOTS = 4096
MAX_ATTACHED = 256       # regions one process has attached at once (each holds a descriptor and a mapping)
CACHE_REGIONS = 64       # regions a worker keeps mapped (least recently used ones are unmapped)
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY

_attached_lock = threading.Lock()
_attached = 0


def attached_count() -> int:
    """Regions this process has attached (``attach_region``) and not closed yet."""
    return _attached


def _count(delta: int) -> None:
    global _attached
    with _attached_lock:
        if delta > 0 and _attached + delta > MAX_ATTACHED:
            raise ProtocolError("LIMIT", f"this service already has {_attached} shared-memory regions attached "
                                         f"(limit {MAX_ATTACHED}); unregister or close regions you no longer use")
        _attached += delta


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


@dataclass(eq=False)
class Region:
    """A mapped shared-memory file of ``slots`` equal slots."""

    name: str
    slots: int
    slot_bytes: int
    mm: mmap.mmap | None
    owner: bool = False
    fd: int = -1                        # kept open for check_size (fstat of the very file mapped)
    ident: tuple[int, int] = (0, 0)     # (st_dev, st_ino) of the file mapped
    counted: bool = field(default=False, repr=False)

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes

    def check_size(self) -> None:
        """BAD_SHM unless the mapped file still holds every slot (call before each read: a read
        past the end of a truncated file is a SIGBUS, not an exception)."""
        if self.mm is None:
            raise ProtocolError("BAD_SHM", f"shared memory {self.name} is closed")
        try:
            st = os.fstat(self.fd) if self.fd >= 0 else os.stat(self.path, follow_symlinks=False)
        except OSError as exc:
            raise ProtocolError("BAD_SHM", f"cannot check shared memory {self.name}: {exc.strerror}") from None
        if st.st_size < self.nbytes:
            raise ProtocolError("BAD_SHM", f"shared memory {self.name} was truncated to {st.st_size} bytes after "
                                           f"registration ({self.nbytes} registered); register a new region")

    def replaced(self) -> bool:
        """True when the path no longer names the file mapped (removed, or replaced by another file)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self.ident

    def _extent(self, slot: int, dtype: str, shape: tuple[int, ...]) -> tuple[int, int]:
        """(element count, byte offset) of a ``dtype[shape]`` tensor in ``slot``, checked."""
        if not 0 <= slot < self.slots:
            raise ProtocolError("BAD_SLOT", f"slot {slot} outside 0..{self.slots - 1}")
        dims = [int(d) for d in shape]
        count = math.prod(dims)  # exact (np.prod wraps around on hostile shapes)
        size = ITEMSIZE.get(dtype)
        if size is None:
            raise ProtocolError("BAD_DTYPE", f"dtype {dtype!r} cannot be read from shared memory")
        n = count * size
        if not dims or min(dims) <= 0 or n > self.slot_bytes:
            raise ProtocolError("SHAPE_MISMATCH", f"{dtype}{list(shape)} needs {n} bytes, slots hold {self.slot_bytes}")
        return count, slot * self.slot_bytes

    def check_slot(self, slot: int, dtype: str, shape: tuple[int, ...]) -> None:
        """Refuse (BAD_SLOT / SHAPE_MISMATCH) a slot or tensor that does not fit, without touching the
        file (the coordinator checks what a client names; the worker that reads it checks the file)."""
        self._extent(slot, dtype, shape)

    def view(self, slot: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        """The slot in place (no copy), after the size check. Touching it is only safe while the
        file is not truncated: readers of a client's region use ``read``."""
        count, offset = self._extent(slot, dtype, shape)
        self.check_size()
        return np.frombuffer(self.mm, dtype=dtype, count=count, offset=offset).reshape(shape)

    def read(self, slot: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        """A private copy of the slot, read with pread from the descriptor: a file truncated at
        any moment gives BAD_SHM (a short read), never SIGBUS (as touching the mapping would)."""
        count, offset = self._extent(slot, dtype, shape)
        if self.mm is None or self.fd < 0:
            raise ProtocolError("BAD_SHM", f"shared memory {self.name} is closed")
        out = np.empty(count, dtype=dtype)
        buf = out.view(np.uint8)
        done = 0
        while done < buf.nbytes:
            got = os.preadv(self.fd, [buf[done:]], offset + done)
            if got <= 0:
                raise ProtocolError("BAD_SHM", f"shared memory {self.name} was truncated after registration "
                                               f"(slot {slot} ends past the end of the file); register a new region")
            done += got
        return out.reshape(shape)

    def close(self) -> None:
        mm, self.mm = self.mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still alive: the mapping goes when the last view does
                pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.counted:
            self.counted = False
            _count(-1)
        if self.owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.owner = False


def create_region(slots: int, slot_bytes: int) -> Region:
    """Client side: a new private region (unlinked again by ``close``)."""
    name = f"hetsched-{os.getpid()}-{secrets.token_hex(6)}"
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.ftruncate(fd, slots * slot_bytes)
        mm = mmap.mmap(fd, slots * slot_bytes)
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return Region(name, slots, slot_bytes, mm, owner=True, fd=fd, ident=(st.st_dev, st.st_ino))


def _valid_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def attach_region(name: str, slots: int, slot_bytes: int) -> Region:
    """Service side: map a client's region read-only after checking its name, type, owner, mode and
    size. Never blocks (a FIFO is refused, not opened for reading); every refusal is BAD_SHM."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ProtocolError("BAD_SHM", "shared-memory name must look like hetsched-<letters/digits>")
    if not (_valid_int(slots) and _valid_int(slot_bytes) and 0 < slots <= MAX_SLOTS and 0 < slot_bytes
            and slots * slot_bytes <= MAX_REGION_BYTES):
        raise ProtocolError("BAD_SHM", f"slots (1..{MAX_SLOTS}) x slot_bytes must be positive and at most "
                                       f"{MAX_REGION_BYTES} bytes")
    path = os.path.join(SHM_DIR, name)
    try:
        lst = os.stat(path, follow_symlinks=False)  # refuse FIFOs, devices, links before opening anything
    except OSError as exc:
        raise ProtocolError("BAD_SHM", f"cannot open shared memory {name}: {exc.strerror}") from None
    if not stat.S_ISREG(lst.st_mode):
        raise ProtocolError("BAD_SHM", f"shared memory {name} is {_kind(lst.st_mode)}; it must be a regular file "
                                       f"in {SHM_DIR}")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise ProtocolError("BAD_SHM", f"cannot open shared memory {name}: {exc.strerror}") from None
    region = None
    try:
        st = os.fstat(fd)
        _check_file(name, st, (lst.st_dev, lst.st_ino), slots * slot_bytes)
        _count(+1)
        region = Region(name, slots, slot_bytes, None, fd=fd, ident=(st.st_dev, st.st_ino), counted=True)
        try:
            region.mm = mmap.mmap(fd, slots * slot_bytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except (OSError, ValueError) as exc:
            raise ProtocolError("BAD_SHM", f"cannot map shared memory {name}: {exc}") from None
        return region
    except BaseException:
        if region is not None:
            region.close()  # closes fd and releases the count
        else:
            os.close(fd)
        raise


def _check_file(name: str, st: os.stat_result, ident: tuple[int, int], nbytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError("BAD_SHM", f"shared memory {name} is {_kind(st.st_mode)}; it must be a regular file")
    if (st.st_dev, st.st_ino) != ident:
        raise ProtocolError("BAD_SHM", f"shared memory {name} was replaced while being opened; register it again")
    if st.st_uid != os.geteuid():
        raise ProtocolError("BAD_SHM", f"shared memory {name} belongs to uid {st.st_uid}, not to the service's "
                                       f"user (uid {os.geteuid()})")
    if st.st_mode & 0o077:
        raise ProtocolError("BAD_SHM", f"shared memory {name} has mode {stat.S_IMODE(st.st_mode):04o}; other users "
                                       "must have no access (create it with mode 0600)")
    if st.st_size != nbytes:
        how = "truncated" if st.st_size < nbytes else "larger than registered"
        raise ProtocolError("BAD_SHM", f"shared memory {name} has {st.st_size} bytes, expected {nbytes} ({how})")


class RegionCache:
    """Worker side: map each region once, by name (read-only), at most ``max_regions`` at a time.

    A region whose file was removed or replaced since it was mapped is dropped (and mapped afresh
    when the path names a valid region again); the least recently used region is unmapped when the
    cache is full. ``forget`` drops a region the coordinator unregistered; ``sweep`` drops every
    region whose file is gone (call it now and then, e.g. with the heartbeat)."""

    def __init__(self, max_regions: int = CACHE_REGIONS) -> None:
        if max_regions < 1:
            raise ValueError("max_regions must be at least 1")
        self.max_regions = max_regions
        self._regions: OrderedDict[str, Region] = OrderedDict()

    def __len__(self) -> int:
        return len(self._regions)

    def __contains__(self, name: object) -> bool:
        return name in self._regions

    def view(self, name: str, slots: int, slot_bytes: int, slot: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        """The slot in place (see ``Region.view``)."""
        return self._use(name, slots, slot_bytes, lambda r: r.view(slot, dtype, shape))

    def read(self, name: str, slots: int, slot_bytes: int, slot: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        """A private copy of the slot that no truncation can turn into SIGBUS (see ``Region.read``)."""
        return self._use(name, slots, slot_bytes, lambda r: r.read(slot, dtype, shape))

    def _use(self, name: str, slots: int, slot_bytes: int, op):
        r = self._regions.get(name)
        if r is not None and (r.slots != slots or r.slot_bytes != slot_bytes or r.replaced()):
            self.forget(name)
            r = None
        if r is None:
            r = attach_region(name, slots, slot_bytes)
            self._regions[name] = r
            while len(self._regions) > self.max_regions:
                self._regions.popitem(last=False)[1].close()
        else:
            self._regions.move_to_end(name)
        try:
            return op(r)
        except ProtocolError as exc:
            if exc.code == "BAD_SHM":  # truncated: unusable until registered again
                self.forget(name)
            raise

    def forget(self, name: str) -> None:
        r = self._regions.pop(name, None)
        if r is not None:
            r.close()

    def sweep(self) -> list[str]:
        """Drop regions whose file was removed or replaced; returns their names."""
        gone = [name for name, r in self._regions.items() if r.replaced()]
        for name in gone:
            self.forget(name)
        return gone

    def close(self) -> None:
        for name in list(self._regions):
            self.forget(name)
