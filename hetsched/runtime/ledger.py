"""The frame ledger (pure): where every frame in flight is, and what to do when things go wrong.

Events in (admit, assign, done, failed, worker lost), decisions out; no sockets, no processes, no
clocks of its own (times are passed in). The pipeline (``hetsched.runtime.pipeline``) feeds it and
carries out what it returns, so exactly-once delivery, replay and poison-frame handling are tested
without processes (tests/test_ledger.py).

- A frame gets one **slot** for its whole life (its tensors at every stage boundary live in that
  slot of each boundary's shared-memory ring); the slot is reused only after ``release``.
- A frame is at exactly one place: waiting for stage k, or assigned to one worker of stage k with an
  **attempt** number. Only a done/failed event with the current attempt counts; anything else is a
  stale duplicate (a replayed frame finished twice) and is dropped and counted.
- When a worker is lost (died, hung and killed) the frames it held go back to the front of their
  stage's queue with a new attempt; its input is intact (the input ring slot is written only by the
  previous stage's attempt, which already finished). Workers take frames in order, so the oldest
  frame it held was the one running: that frame is charged a **failure**; a frame charged
  ``max_failures`` times is a poison frame and is failed with ``FRAME_FAILED`` instead of being
  replayed for ever. The frames that were only queued behind it are replayed free of charge.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

FRAME_FAILED = "FRAME_FAILED"


@dataclass
class Hop:
    stage: int
    worker: int
    t_recv: float
    t_start: float
    t_end: float


@dataclass
class FrameRec:
    fid: int
    slot: int
    source: Any          # stage 0's input, opaque to the ledger (the pipeline knows how to send it)
    t_submit: float
    tag: Any = None
    want_outputs: bool = False
    stage: int = 0
    worker: int | None = None
    attempt: int = 0
    failures: int = 0
    hops: list[Hop] = field(default_factory=list)
    done: bool = False


@dataclass(frozen=True)
class Outcome:
    """What an event means: ``advance`` (now waits for ``frame.stage``), ``finished`` (all stages
    done), ``failed`` (answer it with ``code``), ``requeued`` (replay at ``frame.stage``), ``stale``."""

    kind: str
    frame: FrameRec | None = None
    code: str | None = None
    detail: str = ""


class Ledger:
    def __init__(self, n_stages: int, slots: int, max_failures: int = 2, frame_ids: Iterator[int] | None = None):
        """``frame_ids``: where frame ids come from (share one counter between the ledgers of
        successive plans so ids stay unique across a re-plan)."""
        if n_stages < 1 or slots < 1 or max_failures < 1:
            raise ValueError("n_stages, slots and max_failures must be >= 1")
        self.n_stages, self.max_failures = n_stages, max_failures
        self.frames: dict[int, FrameRec] = {}
        self.waiting: list[deque[int]] = [deque() for _ in range(n_stages)]
        self.by_worker: dict[int, deque[int]] = {}
        self._free = deque(range(slots))
        self._ids = frame_ids if frame_ids is not None else itertools.count()
        self.duplicates = 0
        self.replayed = 0
        self.poisoned = 0

    # ---------------------------------------------------------------- admission
    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self.frames)

    def admit(self, source: Any, t_submit: float, tag: Any = None, want_outputs: bool = False) -> FrameRec:
        if not self._free:
            raise RuntimeError("no free slot: check free_slots before admit")
        rec = FrameRec(next(self._ids), self._free.popleft(), source, t_submit, tag, want_outputs)
        self.frames[rec.fid] = rec
        self.waiting[0].append(rec.fid)
        return rec

    # ---------------------------------------------------------------- dispatch
    def next_waiting(self, stage: int) -> FrameRec | None:
        q = self.waiting[stage]
        return self.frames[q[0]] if q else None

    def assign(self, stage: int, worker: int) -> FrameRec:
        """The oldest frame waiting for ``stage`` goes to ``worker``."""
        rec = self.frames[self.waiting[stage].popleft()]
        rec.worker = worker
        self.by_worker.setdefault(worker, deque()).append(rec.fid)
        return rec

    # ---------------------------------------------------------------- results
    def _current(self, fid: int, stage: int, attempt: int, worker: int) -> FrameRec | None:
        rec = self.frames.get(fid)
        if rec is None or rec.done or rec.stage != stage or rec.attempt != attempt or rec.worker != worker:
            self.duplicates += 1
            return None
        q = self.by_worker.get(worker)
        if q is not None:
            try:
                q.remove(fid)
            except ValueError:
                pass
        rec.worker = None
        return rec

    def on_done(self, fid: int, stage: int, attempt: int, worker: int, hop: Hop) -> Outcome:
        rec = self._current(fid, stage, attempt, worker)
        if rec is None:
            return Outcome("stale")
        rec.hops.append(hop)
        if stage + 1 < self.n_stages:
            rec.stage, rec.attempt = stage + 1, 0
            self.waiting[stage + 1].append(fid)
            return Outcome("advance", rec)
        rec.done = True
        return Outcome("finished", rec)

    def on_failed(self, fid: int, stage: int, attempt: int, worker: int, code: str, detail: str = "") -> Outcome:
        """The stage refused the frame (bad input): it is answered with the stage's error code."""
        rec = self._current(fid, stage, attempt, worker)
        if rec is None:
            return Outcome("stale")
        rec.done = True
        return Outcome("failed", rec, code, detail)

    def on_worker_lost(self, worker: int, reason: str = "worker lost") -> list[Outcome]:
        """Every frame ``worker`` held: requeued (front of its stage's queue, next attempt) or, for a
        frame that has now failed ``max_failures`` times, failed with FRAME_FAILED."""
        held = list(self.by_worker.pop(worker, ()))
        out: list[Outcome] = []
        requeue: list[int] = []
        for i, fid in enumerate(held):
            rec = self.frames.get(fid)
            if rec is None or rec.done or rec.worker != worker:
                continue
            rec.worker = None
            if i == 0:  # the one it was running
                rec.failures += 1
            if rec.failures >= self.max_failures:
                rec.done = True
                self.poisoned += 1
                out.append(Outcome("failed", rec, FRAME_FAILED,
                                   f"the frame was being processed by stage {rec.stage} each time its worker "
                                   f"was lost ({rec.failures} times; last: {reason}); it is dropped"))
                continue
            rec.attempt += 1
            requeue.append(fid)
            self.replayed += 1
            out.append(Outcome("requeued", rec))
        by_stage: dict[int, list[int]] = {}
        for fid in requeue:
            by_stage.setdefault(self.frames[fid].stage, []).append(fid)
        for stage, fids in by_stage.items():
            self.waiting[stage].extendleft(reversed(fids))
        return out

    def release(self, fid: int) -> None:
        """The frame is answered: forget it and free its slot."""
        rec = self.frames.pop(fid, None)
        if rec is None:
            return
        if rec.worker is not None:  # answered while still assigned (drain/timeout): keep the slot out
            return
        for q in (self.waiting[rec.stage],):
            try:
                q.remove(fid)
            except ValueError:
                pass
        self._free.append(rec.slot)

    def abandon_all(self) -> list[FrameRec]:
        """Every frame still in flight (for a stop that cannot wait): the caller answers them."""
        recs = [r for r in self.frames.values() if not r.done]
        for r in recs:
            r.done = True
        return recs

    def snapshot(self) -> dict:
        return {"in_flight": len(self.frames), "free_slots": len(self._free),
                "waiting": [len(q) for q in self.waiting], "replayed": self.replayed,
                "duplicates_dropped": self.duplicates, "poisoned": self.poisoned}
