"""Drift detection and the re-plan decision (pure: numbers in, decisions out).

Clusters do not keep their speed (thermal throttling, DVFS, other programs). Every worker already
reports how long each frame's compute took; :class:`DriftDetector` compares that, per cluster, with
what the plan predicted for the same work, smooths it (exponential moving average over frames) and
says a cluster *drifted* only when its smoothed speed has been off the speed the plan assumed by
more than ``threshold`` for ``hold_s`` seconds (hysteresis: noise and short bursts do not flap the
plan), and, with several clusters, only when the clusters' speeds changed by different amounts (a
slowdown all clusters share leaves the best plan as it is). It also follows the traffic mix: the
share of encoded (JPEG/PNG) frames, which moves work into stage 0.

:func:`decide` then re-plans from the measured speeds (the cluster's layer costs scaled by its
measured slowdown, no re-profiling on the hot path) and says whether the new plan is worth a switch:
its predicted rate must beat the current plan's (evaluated with the same new costs) by ``min_gain``,
or, at a rate within the planner's tie tolerance, its predicted p99 must be lower by ``min_gain``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping

from hetsched.planning.plan import CostTable, Plan, StageSpec


@dataclass
class ClusterDrift:
    speed: float = 1.0            # measured speed relative to the profile (1.0 = as profiled; 0.5 = half)
    assumed: float = 1.0          # the speed last acted on (drift is a departure from it)
    basis: float = 1.0            # the speed the running plan's predictions were computed with
    samples: int = 0
    off_since: float | None = None
    predicted: float = 0.0        # smoothed predicted ms per frame of the frames measured
    measured: float = 0.0         # smoothed measured ms of the same frames
    seen: float | None = None     # the speed at the previous check (a speed still moving is not acted on)
    off_samples: int = 0          # samples when the speed went off (the average must have moved since)


@dataclass
class DriftDetector:
    threshold: float = 0.15       # relative deviation of speed that counts as drift
    hold_s: float = 2.0           # ... for at least this long
    weight: float = 0.05          # EWMA weight of one frame
    min_samples: int = 50
    settle_frames: int = 40       # frames measured since the speed went off before it is acted on
    mix_threshold: float = 0.3    # change of the encoded share that counts as drift
    clusters: dict[str, ClusterDrift] = field(default_factory=dict)
    encoded_share: float = 0.0    # smoothed share of encoded frames
    assumed_share: float = 0.0
    mix_samples: int = 0
    mix_off_since: float | None = None

    def on_frame(self, cluster: str, measured_ms: float, predicted_ms: float) -> None:
        """One frame's compute on a worker of ``cluster`` against the plan's prediction for it."""
        if measured_ms <= 0 or predicted_ms <= 0:
            return
        c = self.clusters.setdefault(cluster, ClusterDrift())
        # a ratio of smoothed sums, not a mean of ratios: on a duty-cycled core a short frame may wait
        # a whole busy burst, and averaging per-frame speeds would overweight such frames
        if c.samples == 0:
            c.predicted, c.measured = predicted_ms, measured_ms
        else:
            c.predicted += self.weight * (predicted_ms - c.predicted)
            c.measured += self.weight * (measured_ms - c.measured)
        # speed relative to the prediction, times the speed the prediction was computed with
        c.speed = c.basis * c.predicted / c.measured
        c.samples += 1

    def on_submit(self, encoded: bool, n: int = 1) -> None:
        """``n`` frames of one kind (the moving average in closed form: as ``n`` single calls)."""
        if n <= 0:
            return
        x = 1.0 if encoded else 0.0
        rest = n - 1 if self.mix_samples == 0 else n  # the very first frame sets the share
        if rest < n:
            self.encoded_share = x
        self.encoded_share += (1.0 - (1.0 - self.weight) ** rest) * (x - self.encoded_share)
        self.mix_samples += n

    def drifted(self, now: float) -> list[str]:
        """Reasons the plan no longer fits (empty when it fits)."""
        reasons = []
        # What a plan depends on is how fast clusters are relative to each other. Under full traffic
        # every cluster measures a little below its quiet profile, by an amount that wanders with the
        # service's own CPU (coordinator, clients): a change all clusters share is not drift. With more
        # than one cluster measured, drift needs the clusters' changes to differ by the threshold.
        change = {n: c.speed / c.assumed for n, c in self.clusters.items() if c.samples >= self.min_samples}
        spread = max(change.values()) / min(change.values()) - 1.0 if len(change) > 1 else float("inf")
        moving = False
        for name, c in sorted(self.clusters.items()):
            off = (c.samples >= self.min_samples and abs(c.speed / c.assumed - 1.0) > self.threshold
                   and spread > self.threshold)
            settled = c.seen is not None and abs(c.speed / c.seen - 1.0) <= self.threshold / 2
            c.seen = c.speed
            if not off:
                c.off_since = None
                continue
            if c.off_since is None:
                c.off_since, c.off_samples = now, c.samples
            # a moving average moves by frames, not by seconds: a slowed worker measures few frames, and
            # acting before ~1/weight of them arrived would act on a speed half-way to the new one (this
            # holds back every cluster: a plan made now would fit neither that cluster's old speed nor
            # its new one)
            arriving = c.samples - c.off_samples < self.settle_frames
            moving = moving or arriving
            if now - c.off_since >= self.hold_s and settled and not arriving:
                reasons.append(f"cluster {name} runs at {c.speed:.2f} of its profiled speed "
                               f"(plan assumed {c.assumed:.2f}) for {now - c.off_since:.1f} s")
        if moving:
            reasons = []
        off = self.mix_samples >= self.min_samples and abs(self.encoded_share - self.assumed_share) > self.mix_threshold
        if not off:
            self.mix_off_since = None
        else:
            self.mix_off_since = now if self.mix_off_since is None else self.mix_off_since
            if now - self.mix_off_since >= self.hold_s:
                reasons.append(f"{self.encoded_share:.0%} of frames are encoded images (plan assumed "
                               f"{self.assumed_share:.0%})")
        return reasons

    def speeds(self) -> dict[str, float]:
        return {n: c.speed for n, c in self.clusters.items() if c.samples >= self.min_samples}

    def adopt(self, speeds: Mapping[str, float], encoded_share: float, new_plan: bool = True) -> None:
        """Take these speeds and this mix as the new normal. ``new_plan``: a plan made for them now
        runs (its predictions assume them); False: the running plan was kept (its predictions did not
        change, only what counts as drift did)."""
        for name, s in speeds.items():
            c = self.clusters.setdefault(name, ClusterDrift())
            c.assumed, c.off_since, c.seen = s, None, None
            if new_plan:
                c.basis, c.samples = s, 0  # measure the new plan afresh
                c.speed = s
        self.assumed_share, self.mix_off_since = encoded_share, None


def scaled_costs(base: CostTable, speeds: Mapping[str, float], preprocess_ms: Mapping[str, float],
                 encoded_share: float) -> CostTable:
    """The profiled costs with each cluster's compute divided by its measured speed, and stage 0's
    decoding weighted by the measured share of encoded frames."""
    layer_ms = {c: {t: tuple(v / speeds.get(c, 1.0) for v in row) for t, row in per_t.items()}
                for c, per_t in base.layer_ms.items()}
    input_ms = {c: encoded_share * ms / speeds.get(c, 1.0) for c, ms in preprocess_ms.items()}
    return dataclasses.replace(base, layer_ms=layer_ms, input_ms=input_ms)


def as_assignment(plan: Plan) -> list[StageSpec]:
    """A plan's layout, to evaluate it again under other costs."""
    return [StageSpec(s.first_layer, s.last_layer, tuple((m.cluster, len(m.cores), m.threads, m.replicas)
                                                          for m in s.members)) for s in plan.stages]


@dataclass(frozen=True)
class Decision:
    switch: bool
    reason: str
    current: Plan            # the running plan, re-evaluated under the measured costs
    candidate: Plan
    gain: float              # relative throughput gain (or p99 gain when rates tie)
    kind: str = "rate"       # "rate": for throughput; "p99": a latency trade at a tied rate; "revert"


def _used_cores(plan: Plan) -> int:
    return len({c for s in plan.stages for c in s.cores})


def decide(current_plan: Plan, costs: CostTable, plan_fn: Callable[[CostTable], Plan],
           evaluate_fn: Callable[[CostTable, list], Plan], *, min_gain: float = 0.1,
           tie_tolerance: float = 0.02) -> Decision:
    """Re-plan with ``costs`` (already scaled to the measured speeds) and decide whether to switch."""
    now_plan = evaluate_fn(costs, as_assignment(current_plan))
    cand = plan_fn(costs)
    if cand.shape() == current_plan.shape():
        return Decision(False, "the best plan for the measured speeds is the running one", now_plan, cand, 0.0)
    rate_gain = cand.throughput_fps / now_plan.throughput_fps - 1.0
    if rate_gain > min_gain:
        return Decision(True, f"predicted {cand.throughput_fps:.1f} fps vs {now_plan.throughput_fps:.1f} fps "
                              f"(+{rate_gain:.0%})", now_plan, cand, rate_gain)
    # Trading a little predicted rate for latency is fine while every core keeps working; a plan that
    # leaves cores idle moves the service's own CPU (coordinator, clients) onto the cores it keeps,
    # which the measured speeds do not show (measured on 2 cores: big alone at 91 fps, predicted 124).
    floor = -tie_tolerance if _used_cores(cand) >= _used_cores(now_plan) else 0.0
    if rate_gain >= floor:
        p99_gain = 1.0 - cand.latency_ms / now_plan.latency_ms
        if p99_gain > min_gain:
            return Decision(True, f"predicted p99 {cand.latency_ms:.1f} ms vs {now_plan.latency_ms:.1f} ms "
                                  f"(-{p99_gain:.0%}) at {cand.throughput_fps:.1f} vs "
                                  f"{now_plan.throughput_fps:.1f} fps", now_plan, cand, p99_gain, kind="p99")
    return Decision(False, f"a new plan would gain too little (rate {rate_gain:+.0%})", now_plan, cand, rate_gain)
