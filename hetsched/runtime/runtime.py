"""The running service's pipelines: the active plan, a new plan starting, old plans draining.

The server talks to a :class:`Runtime` as it would to one pipeline. Every ``replan.check_s`` the
runtime asks the drift detector (``runtime.drift``) whether the clusters' measured speeds or the
traffic mix have left the plan behind; if so it re-plans from the measured speeds and, when the new
plan is worth it, starts it *beside* the running one (its workers idle until they are ready, the old
plan keeps serving: the pause is bounded by nothing but a few dispatches). Once every new worker
runs, new frames go to the new plan; frames already admitted finish in the old one (frame ids are
unique across plans, the server keeps per-stream order and exactly-once delivery across the
switch); the old plan is retired when it holds no frame. If the new plan's workers fail to start,
the old plan stays. Every decision is logged and kept in ``history``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from hetsched.errors import HetschedError
from hetsched.planning.plan import CostTable, Plan
from hetsched.runtime.drift import Decision, DriftDetector, decide, scaled_costs
from hetsched.runtime.pipeline import FrameResult, Pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplanSettings:
    enabled: bool = True
    check_s: float = 2.0
    min_gain: float = 0.1
    threshold: float = 0.15   # relative speed deviation that counts as drift
    tie_tolerance: float = 0.02


def plan_summary(plan: Plan) -> str:
    parts = []
    for s in plan.stages:
        pool = "+".join(f"{m.cluster}[{','.join(map(str, m.cores))}]" for m in s.members)
        parts.append(f"{s.first_layer}-{s.last_layer}:{pool}")
    return " | ".join(parts)


class Runtime:
    def __init__(self, plan: Plan, make_pipeline: Callable[[Plan, int, Any], Pipeline], *,
                 base_costs: CostTable | None = None, plan_fn: Callable[[CostTable], Plan] | None = None,
                 evaluate_fn: Callable[[CostTable, list], Plan] | None = None,
                 preprocess_ms: dict | None = None, encoded_share: float = 0.0,
                 settings: ReplanSettings = ReplanSettings(), follow_traffic: bool = True):
        self._make = make_pipeline
        self._ids = itertools.count()
        self.generation = 0
        self.active = make_pipeline(plan, 0, self._ids)
        self.active.on_direct_done = self._note_direct
        self.starting: Pipeline | None = None
        self.draining: list[Pipeline] = []
        self.settings = settings
        self.base_costs, self.plan_fn, self.evaluate_fn = base_costs, plan_fn, evaluate_fn
        self.preprocess_ms = dict(preprocess_ms or {})
        self.follow_traffic = follow_traffic
        self.detector = DriftDetector(threshold=settings.threshold, hold_s=settings.check_s)
        self.detector.adopt({}, encoded_share)
        self.active.observer = self.detector.on_frame
        self.history: deque = deque(maxlen=50)
        self._pending_decision: Decision | None = None
        self._regions: dict[int, tuple] = {}
        self._pollers: list = []
        self._last_check = time.monotonic()
        self._done_times: deque = deque(maxlen=4096)
        self._failed_plans: dict[tuple, tuple[float, str]] = {}   # plan shape -> (when, why)
        self._trial: dict | None = None   # a latency trade on probation: kept only if its rate holds
        self._retired_counts = {"replayed": 0, "duplicates": 0, "restarts": 0}
        self._t_switched = 0.0
        self.replans = 0
        self._gone: deque = deque(maxlen=16)   # generations whose workers are all gone (lane clients replay)
        self._n_gone = 0

    # ------------------------------------------------------------------ like one pipeline
    def __getattr__(self, name: str) -> Any:  # graph, plan, preprocess, workers, supervisor, ...
        if name == "active":
            raise AttributeError(name)
        return getattr(self.active, name)

    def start(self) -> "Runtime":
        self.active.start()
        return self

    def stop(self, drain_timeout: float = 0.0) -> None:
        for p in [self.active, *self.draining] + ([self.starting] if self.starting else []):
            try:
                p.stop(drain_timeout=drain_timeout)
            except Exception as exc:  # keep stopping the others
                log.error("stopping pipeline generation %d: %s", p.generation, exc)

    @property
    def inflight(self) -> dict:
        out = dict(self.active.ledger.frames)
        for p in self.draining:
            out.update(p.ledger.frames)
        return out

    @property
    def replayed(self) -> int:
        return self._retired_counts["replayed"] + sum(p.ledger.replayed for p in [self.active, *self.draining])

    @property
    def duplicates_dropped(self) -> int:
        return self._retired_counts["duplicates"] + sum(p.ledger.duplicates for p in [self.active, *self.draining])

    def register(self, poller) -> None:
        self._pollers.append(poller)
        for p in self._live():
            p.register(poller)

    def _live(self) -> list[Pipeline]:
        return [self.active, *self.draining] + ([self.starting] if self.starting else [])

    def _unregister(self, p: Pipeline) -> None:
        for poller in self._pollers:
            for sock in (p._results, p._ctl):
                if sock is not None:
                    try:
                        poller.unregister(sock)
                    except KeyError:
                        pass

    def add_region(self, rid: int, name: str, slots: int, slot_bytes: int) -> None:
        self._regions[rid] = (name, slots, slot_bytes)
        for p in [self.active] + ([self.starting] if self.starting else []):
            p.add_region(rid, name, slots, slot_bytes)

    def remove_region(self, rid: int) -> None:
        self._regions.pop(rid, None)
        for p in self._live():
            p.remove_region(rid)

    def note_submit(self, encoded: bool, n: int = 1) -> None:
        self.detector.on_submit(encoded, n)

    def _note_direct(self, n: int) -> None:
        now = time.monotonic()
        self._done_times.extend([now] * n)

    # ------------------------------------------------------------------ the direct lane
    @property
    def lane_version(self) -> tuple:
        return (self.generation, self.active.lane_version, self._n_gone)

    def lane_state(self) -> dict:
        """The active plan's lane (None: it has none) and the generations that are gone: a lane client
        replays what it still waits for from them (docs/protocol.md, "Direct lane")."""
        return {"lane": self.active.lane_info(), "gone": list(self._gone)}

    # ------------------------------------------------------------------ the loop
    def process(self, events: dict) -> list[FrameResult]:
        done = self.active.process(events)
        for p in list(self.draining):
            done += p.process(events)
            if not p.ledger.in_flight and p.retired():
                self._retire_counts(p)
                self._gone.append(p.generation)
                self._n_gone += 1
                self.draining.remove(p)
                self._unregister(p)
                log.info("plan generation %d retired", p.generation)
        if self.starting is not None:
            self._advance_start(events)
        now = time.monotonic()
        for _ in done:
            self._done_times.append(now)
        if self.settings.enabled and self.plan_fn is not None and now - self._last_check >= self.settings.check_s:
            self._last_check = now
            self._check(now)
        return done

    def measured_fps(self, window_s: float = 2.0) -> float:
        now = time.monotonic()
        n = sum(1 for t in self._done_times if now - t <= window_s)
        return n / window_s

    def _retire_counts(self, p: Pipeline) -> None:
        self._retired_counts["replayed"] += p.ledger.replayed
        self._retired_counts["duplicates"] += p.ledger.duplicates
        self._retired_counts["restarts"] += p.supervisor.restarts

    # ------------------------------------------------------------------ re-planning
    def _check(self, now: float) -> None:
        if self.starting is not None or self.base_costs is None:
            return
        if now - self._t_switched < 2 * self.settings.check_s:  # let a new plan settle before judging it
            return
        if self._trial is not None and self._judge_trial(now):
            return
        reasons = self.detector.drifted(now)
        if not reasons:
            return
        speeds = {c: d.assumed for c, d in self.detector.clusters.items()}
        speeds.update(self.detector.speeds())
        share = self.detector.encoded_share if self.follow_traffic else self.detector.assumed_share
        costs = scaled_costs(self.base_costs, speeds, self.preprocess_ms, share)
        decision = decide(self.active.plan, costs, self.plan_fn, self.evaluate_fn,
                          min_gain=self.settings.min_gain, tie_tolerance=self.settings.tie_tolerance)
        entry = self._entry(now, reasons, decision, speeds, share)
        failed = self._failed_plans.get(decision.candidate.shape())
        if decision.switch and failed is not None and now - failed[0] < 60.0:
            entry.update(switch=False, decision=f"this plan {failed[1]} less than 60 s ago")
        log.warning("re-plan check: %s; %s", "; ".join(reasons), entry["decision"])
        if entry["switch"]:
            self._begin_switch(decision, speeds, share, entry)
        else:
            # the plan still fits what was measured: drift is judged against these speeds from now on
            self.detector.adopt(speeds, share, new_plan=False)
        self.history.append(entry)

    def _entry(self, now: float, reasons: list[str], decision: Decision, speeds: dict, share: float) -> dict:
        """A decision as the history keeps it."""
        cur, cand = decision.current, decision.candidate
        return {"t": now, "generation": self.generation, "reasons": reasons, "switch": decision.switch,
                "decision": decision.reason, "kind": decision.kind,
                "speeds": {c: round(s, 3) for c, s in speeds.items()}, "encoded_share": round(share, 3),
                "old_plan": plan_summary(cur), "new_plan": plan_summary(cand),
                "predicted_gain": round(decision.gain, 3),
                "predicted_fps": [round(cur.throughput_fps, 1), round(cand.throughput_fps, 1)],
                "predicted_p99_ms": [round(cur.latency_ms, 2), round(cand.latency_ms, 2)]}

    def _judge_trial(self, now: float) -> bool:
        """A latency trade was taken on a predicted tie in rate. Predictions of plans of different
        kinds err differently (hops cost the service CPU the cost table does not hold), so the rate is
        measured once the plan settled: if it fell by more than ``min_gain``, the previous plan comes
        back and the trade is not tried again for 60 s. True when a switch back began."""
        trial, self._trial = self._trial, None
        entry = trial["entry"]
        fps = self.measured_fps(self.settings.check_s)
        before = entry.get("fps_before") or 0.0
        entry["fps_after"] = round(fps, 1)
        if before <= 0 or fps >= (1.0 - self.settings.min_gain) * before:
            entry["kept"] = True
            return False
        entry["kept"] = False
        self._failed_plans[self.active.plan.shape()] = (now, f"lost rate as a latency trade ({fps:.1f} fps "
                                                              f"against {before:.1f} before)")
        reason = (f"the latency trade measured {fps:.1f} fps against {before:.1f} fps before it: "
                  f"back to the previous plan")
        speeds = {c: d.assumed for c, d in self.detector.clusters.items()}
        decision = Decision(True, reason, self.active.plan, trial["previous"], before / max(fps, 1e-9) - 1.0,
                            kind="revert")
        back = self._entry(now, [reason], decision, speeds, self.detector.assumed_share)
        log.warning("re-plan check: %s", reason)
        self._begin_switch(decision, speeds, self.detector.assumed_share, back)
        self.history.append(back)
        return True

    def _begin_switch(self, decision: Decision, speeds: dict, share: float, entry: dict) -> None:
        gen = self.generation + 1
        try:
            p = self._make(decision.candidate, gen, self._ids)
            p.on_direct_done = self._note_direct
            for rid, reg in self._regions.items():
                p.add_region(rid, *reg)
            p.begin()
        except Exception as exc:
            log.error("the new plan's workers failed to start (%s): keeping plan generation %d", exc, self.generation)
            entry.update(switch=False, decision=f"new plan failed to start: {exc}")
            self._failed_plans[decision.candidate.shape()] = (time.monotonic(), "failed to start")
            return
        for poller in self._pollers:
            p.register(poller)
        self.starting = p
        self._pending_decision = decision
        self._switch_meta = {"speeds": speeds, "share": share, "entry": entry, "t_begin": time.monotonic(),
                             "fps_before": round(self.measured_fps(), 1)}

    def _advance_start(self, events: dict) -> None:
        p = self.starting
        try:
            p.process(events)
        except HetschedError as exc:
            log.error("the new plan's workers failed to start (%s): keeping plan generation %d", exc, self.generation)
            self._switch_meta["entry"].update(switch=False, decision=f"new plan failed to start: {exc}")
            self._failed_plans[p.plan.shape()] = (time.monotonic(), "failed to start")
            self.starting = None
            self._unregister(p)
            p.stop(drain_timeout=0)
            return
        if not p.running:
            return
        old = self.active
        self.active, self.starting = p, None
        p.observer = self.detector.on_frame
        old.observer = None
        self.draining.append(old)
        self.generation = p.generation
        self.replans += 1
        self._t_switched = time.monotonic()
        meta = self._switch_meta
        self.detector.adopt(meta["speeds"], meta["share"], new_plan=True)
        entry = meta["entry"]
        entry.update(generation=p.generation, start_s=round(time.monotonic() - meta["t_begin"], 3),
                     fps_before=meta["fps_before"], t_switch=time.monotonic())
        if self._pending_decision is not None and self._pending_decision.kind == "p99":
            self._trial = {"entry": entry, "previous": old.plan}
        log.warning("switched to plan generation %d (%s) after %.2f s; generation %d drains %d frame(s)",
                    p.generation, plan_summary(p.plan), entry["start_s"], old.generation, old.ledger.in_flight)

    def describe(self) -> dict:
        now = time.monotonic()
        for e in self.history:  # measured gain: the rate over the window after the switch
            if e.get("t_switch") and "fps_after" not in e and now - e["t_switch"] >= 2 * self.settings.check_s:
                e["fps_after"] = round(self.measured_fps(self.settings.check_s), 1)
        return {"generation": self.generation, "replans": self.replans, "starting": self.starting is not None,
                "draining": [p.generation for p in self.draining], "plan": plan_summary(self.active.plan),
                "measured_speeds": {c: round(d.speed, 3) for c, d in self.detector.clusters.items() if d.samples},
                "encoded_share": round(self.detector.encoded_share, 3),
                "history": [self._history_entry(e, now) for e in self.history]}

    def switch_marks(self) -> list[dict]:
        """Each plan switch (monotonic seconds of the decision and of the switch), for the trace."""
        return [{"t_decision": e["t"], "t_switch": e["t_switch"], "generation": e["generation"],
                 "old_plan": e["old_plan"], "new_plan": e["new_plan"], "decision": e["decision"]}
                for e in self.history if e.get("t_switch")]

    @staticmethod
    def _history_entry(e: dict, now: float) -> dict:
        """A decision as reported: monotonic times become ages (seconds before this report)."""
        out = {k: v for k, v in e.items() if k not in ("t", "t_switch")}
        out["age_s"] = round(now - e["t"], 3)
        if e.get("t_switch"):
            out["switch_age_s"] = round(now - e["t_switch"], 3)
        return out
