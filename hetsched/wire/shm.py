"""Shared-memory input slots for clients on the same host (the zero-copy input path).

A local client creates a file under /dev/shm (mode 0600: only the same user can map it), sized for
``slots`` model inputs, and registers it with the service. It then writes a frame into a free
slot and submits only a small header naming the slot. The coordinator keeps the reference (so it
can replay the frame) and stage 0 reads the tensor straight from the mapping: the 600 KB input of
SqueezeNet is never copied through a socket. A slot is free again once its frame's reply arrived.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
from dataclasses import dataclass

import numpy as np

from hetsched.errors import ProtocolError

SHM_DIR = "/dev/shm"
NAME_RE = re.compile(r"^hetsched-[A-Za-z0-9_-]{1,64}$")
MAX_REGION_BYTES = 1 << 30


@dataclass
class Region:
    """A mapped shared-memory file of ``slots`` equal slots."""

    name: str
    slots: int
    slot_bytes: int
    mm: mmap.mmap
    owner: bool = False

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    def view(self, slot: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        if not 0 <= slot < self.slots:
            raise ProtocolError("BAD_SLOT", f"slot {slot} outside 0..{self.slots - 1}")
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if n > self.slot_bytes:
            raise ProtocolError("SHAPE_MISMATCH", f"{dtype}{list(shape)} needs {n} bytes, slots hold {self.slot_bytes}")
        return np.frombuffer(self.mm, dtype=dtype, count=int(np.prod(shape)),
                             offset=slot * self.slot_bytes).reshape(shape)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:  # a view is still alive; the mapping goes with the process
            pass
        if self.owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def create_region(slots: int, slot_bytes: int) -> Region:
    """Client side: a new private region (unlinked again by ``close``)."""
    name = f"hetsched-{os.getpid()}-{secrets.token_hex(6)}"
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, slots * slot_bytes)
        mm = mmap.mmap(fd, slots * slot_bytes)
    finally:
        os.close(fd)
    return Region(name, slots, slot_bytes, mm, owner=True)


def attach_region(name: str, slots: int, slot_bytes: int) -> Region:
    """Service side: map a client's region after checking its name, owner, type and size."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ProtocolError("BAD_SHM", "shared-memory name must look like hetsched-<letters/digits>")
    if not (isinstance(slots, int) and isinstance(slot_bytes, int) and 0 < slots <= 4096 and 0 < slot_bytes
            and slots * slot_bytes <= MAX_REGION_BYTES):
        raise ProtocolError("BAD_SHM", f"slots x slot_bytes must be positive and at most {MAX_REGION_BYTES}")
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ProtocolError("BAD_SHM", f"cannot open shared memory {name}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        import stat
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ProtocolError("BAD_SHM", "shared memory must be a regular file owned by the service's user")
        if st.st_size != slots * slot_bytes:
            raise ProtocolError("BAD_SHM", f"shared memory has {st.st_size} bytes, expected {slots * slot_bytes}")
        mm = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return Region(name, slots, slot_bytes, mm)


class RegionCache:
    """Worker side: map each region once, by name (read-only)."""

    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}

    def view(self, name: str, slots: int, slot_bytes: int, slot: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        r = self._regions.get(name)
        if r is None or r.slots != slots or r.slot_bytes != slot_bytes:
            r = self._regions[name] = attach_region(name, slots, slot_bytes)
        return r.view(slot, dtype, shape)

    def forget(self, name: str) -> None:
        r = self._regions.pop(name, None)
        if r is not None:
            r.close()
