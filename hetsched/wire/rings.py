"""Shared-memory rings for activations between stages on one host.

A ring belongs to one stage boundary: ``slots`` equal slots, each holding the boundary's tensors at
fixed, 64-byte aligned offsets. The coordinator creates every ring when a pipeline starts (files in
/dev/shm, mode 0600, removed when it stops; stale ones of dead coordinators are swept at start) and
gives each frame one slot index for its whole life: the frame's tensors at boundary b live in
``ring[b][slot]``. A worker of stage k reads ``ring[k][slot]`` and onnxruntime writes its outputs
straight into ``ring[k+1][slot]`` (IOBinding on preallocated buffers), so activations are never
copied through a socket. A slot is reused only after its frame is answered (``runtime.ledger``).
"""

from __future__ import annotations

import math
import mmap
import os
import re
import secrets
from dataclasses import dataclass

from hetsched.wire.dtypes import ITEMSIZE

SHM_DIR = "/dev/shm"
ALIGN = 64
_RUN_RE = re.compile(r"^hetsched-run-(\d+)-[0-9a-f]+-b\d+$")


@dataclass(frozen=True)
class RingSpec:
    """What a process needs to map a ring (picklable, sent to workers in their spec)."""

    name: str
    slots: int
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]  # (tensor name, numpy dtype, shape)

    def offsets(self) -> tuple[tuple[int, ...], int]:
        """Byte offset of each tensor in a slot, and the slot size (multiple of 64)."""
        offs, pos = [], 0
        for _, dtype, shape in self.tensors:
            offs.append(pos)
            n = math.prod(shape) * ITEMSIZE[dtype]
            pos += -(-n // ALIGN) * ALIGN
        return tuple(offs), max(pos, ALIGN)

    @property
    def slot_bytes(self) -> int:
        return self.offsets()[1]

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)


class Ring:
    """A mapped ring; ``views(slot)`` are numpy arrays over the slot's tensors (made once, cached)."""

    def __init__(self, spec: RingSpec, mm: mmap.mmap, owner: bool):
        import numpy as np  # not at module level: workers import this module before they pin themselves
        self.spec, self._mm, self.owner = spec, mm, owner
        offs, self.slot_bytes = spec.offsets()
        self._views: list[list] = []
        for s in range(spec.slots):
            base = s * self.slot_bytes
            self._views.append([np.frombuffer(mm, dtype=dtype, count=math.prod(shape),
                                              offset=base + off).reshape(shape)
                                for (_, dtype, shape), off in zip(spec.tensors, offs)])

    def views(self, slot: int) -> list:
        return self._views[slot]

    def close(self) -> None:
        self._views = []
        try:
            self._mm.close()
        except BufferError:  # a view is still referenced somewhere: the mapping goes with the process
            pass
        if self.owner:
            try:
                os.unlink(self.spec.path)
            except FileNotFoundError:
                pass


def new_ring_name(boundary: int, token: str | None = None) -> str:
    return f"hetsched-run-{os.getpid()}-{token or secrets.token_hex(4)}-b{boundary}"


def create_ring(spec: RingSpec) -> Ring:
    size = spec.slots * spec.slot_bytes
    fd = os.open(spec.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    return Ring(spec, mm, owner=True)


def attach_ring(spec: RingSpec, writable: bool) -> Ring:
    size = spec.slots * spec.slot_bytes
    fd = os.open(spec.path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_size != size:
            raise OSError(f"ring {spec.name} has {st.st_size} bytes, expected {size}")
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    finally:
        os.close(fd)
    return Ring(spec, mm, owner=False)


def sweep_stale_rings() -> int:
    """Remove rings left by coordinators that no longer run (killed with SIGKILL); returns how many."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        m = _RUN_RE.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed += 1
        except OSError:
            pass
    return removed
