"""Worker supervision as a pure state machine: events in, actions out (no processes, no sockets).

The coordinator feeds it what it observes (a worker started, said READY/RUNNING, sent a heartbeat,
exited) and the current time; ``tick`` returns what to do: ``kill`` a hung worker, ``lost`` once a
worker is known to be gone (dead: its frames can be handed to others), ``spawn`` a replacement (after
a back-off when it keeps crashing on start) and ``recovered`` once every worker runs again. A killed
worker is reported lost only when it is seen dead, so a hung worker that wakes up can never write a
slot its frame's replay is using. Nothing here blocks. Tested without processes in
tests/test_supervisor.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

STARTING, RUNNING, KILLING, DEAD = "starting", "running", "killing", "dead"


@dataclass(frozen=True)
class Action:
    kind: str          # "kill" | "lost" | "spawn" | "recovered"
    key: Hashable = None
    reason: str = ""


@dataclass
class SlotState:
    state: str = STARTING
    started_at: float = 0.0
    last_seen: float = 0.0
    restarts: int = 0
    consecutive_failures: int = 0
    next_start: float = 0.0
    last_reason: str = ""
    heartbeat_timeout: float = 1.0


@dataclass
class Supervisor:
    heartbeat_timeout: float = 1.0      # no heartbeat for this long while running -> hung -> killed
    start_timeout: float = 60.0         # no RUNNING this long after a (re)start -> killed
    crash_window: float = 1.0           # dying within this many seconds of starting counts as a crash on start
    backoff_base: float = 0.5
    backoff_max: float = 10.0
    degraded_after: int = 3             # consecutive crashes on start before the service says it is degraded
    slots: dict[Hashable, SlotState] = field(default_factory=dict)
    recovering: bool = False
    recoveries: int = 0
    t_failure: float | None = None      # when the current recovery began

    def add(self, key: Hashable, now: float, heartbeat_timeout: float | None = None) -> None:
        self.slots[key] = SlotState(STARTING, now, now, heartbeat_timeout=heartbeat_timeout or self.heartbeat_timeout)

    # ------------------------------------------------------------------ events
    def on_running(self, key: Hashable, now: float) -> None:
        s = self.slots[key]
        if s.state == STARTING:
            s.state = RUNNING
            s.last_seen = now

    def on_heartbeat(self, key: Hashable, now: float) -> None:
        self.slots[key].last_seen = now

    def on_exit(self, key: Hashable, now: float, reason: str) -> None:
        s = self.slots[key]
        if s.state == DEAD:
            return
        crashed_on_start = s.state == STARTING or now - s.started_at < self.crash_window
        s.consecutive_failures = s.consecutive_failures + 1 if crashed_on_start else 1
        delay = 0.0 if s.consecutive_failures <= 1 else min(
            self.backoff_max, self.backoff_base * 2 ** (s.consecutive_failures - 2))
        if s.state != KILLING:
            s.last_reason = reason
        s.state, s.next_start = DEAD, now + delay
        if not self.recovering:
            self.recovering, self.t_failure = True, now

    def remove(self, key: Hashable) -> None:
        """The worker is retired on purpose (a new plan): no longer supervised."""
        self.slots.pop(key, None)

    # ------------------------------------------------------------------ decisions
    def tick(self, now: float, alive: dict[Hashable, bool]) -> list[Action]:
        actions: list[Action] = []
        for key, s in self.slots.items():
            if s.state != DEAD and not alive.get(key, False):
                self.on_exit(key, now, "exited")
                actions.append(Action("lost", key, s.last_reason))
            elif s.state == RUNNING and now - s.last_seen > s.heartbeat_timeout:
                s.last_reason = f"hung: no heartbeat for {now - s.last_seen:.1f} s"
                s.state = KILLING
                actions.append(Action("kill", key, s.last_reason))
            elif s.state == STARTING and now - s.started_at > self.start_timeout:
                s.last_reason = f"no RUNNING within {self.start_timeout:.0f} s of starting"
                s.state = KILLING
                actions.append(Action("kill", key, s.last_reason))
        for key, s in self.slots.items():
            if s.state == DEAD and now >= s.next_start:
                s.state, s.started_at, s.last_seen = STARTING, now, now
                s.restarts += 1
                actions.append(Action("spawn", key, s.last_reason))
        if self.recovering and all(s.state == RUNNING for s in self.slots.values()):
            self.recovering = False
            self.recoveries += 1
            actions.append(Action("recovered"))
        return actions

    def mark_stable(self, key: Hashable, now: float) -> None:
        """A worker that has run past the crash window is no longer crash-looping."""
        s = self.slots[key]
        if s.state == RUNNING and now - s.started_at >= self.crash_window:
            s.consecutive_failures = 0

    @property
    def degraded(self) -> bool:
        return any(s.consecutive_failures >= self.degraded_after for s in self.slots.values())

    @property
    def restarts(self) -> int:
        return sum(s.restarts for s in self.slots.values())

    def describe(self) -> dict:
        return {"recovering": self.recovering, "degraded": self.degraded, "restarts": self.restarts,
                "recoveries": self.recoveries,
                "workers": {str(k): {"state": s.state, "restarts": s.restarts, "last_reason": s.last_reason,
                                     "consecutive_failures": s.consecutive_failures}
                            for k, s in self.slots.items()}}
