"""The frame ledger and the dispatcher, without processes: events in, decisions out."""

from __future__ import annotations

import random

import pytest

from hetsched.runtime.dispatch import Dispatcher
from hetsched.runtime.ledger import FRAME_FAILED, Hop, Ledger


def hop(stage, worker):
    return Hop(stage, worker, 0.0, 0.0, 0.0)


def test_slots_are_unique_and_reused_only_after_release():
    led = Ledger(n_stages=2, slots=3)
    recs = [led.admit("x", 0.0) for _ in range(3)]
    assert sorted(r.slot for r in recs) == [0, 1, 2] and led.free_slots == 0
    with pytest.raises(RuntimeError):
        led.admit("x", 0.0)
    r = led.assign(0, worker=7)
    assert led.on_done(r.fid, 0, 0, 7, hop(0, 7)).kind == "advance"
    assert led.free_slots == 0                       # still in flight at stage 1
    r = led.assign(1, worker=8)
    out = led.on_done(r.fid, 1, 0, 8, hop(1, 8))
    assert out.kind == "finished" and led.free_slots == 0   # finished, not yet answered
    led.release(r.fid)
    assert led.free_slots == 1 and led.admit("y", 1.0).slot == recs[0].slot


def test_a_result_counts_once_stale_ones_are_dropped():
    led = Ledger(n_stages=1, slots=2)
    f = led.admit("x", 0.0)
    led.assign(0, worker=1)
    assert led.on_done(f.fid, 0, 1, 1, hop(0, 1)).kind == "stale"     # wrong attempt
    assert led.on_done(f.fid, 0, 0, 2, hop(0, 2)).kind == "stale"     # wrong worker
    assert led.on_done(f.fid, 0, 0, 1, hop(0, 1)).kind == "finished"
    assert led.on_done(f.fid, 0, 0, 1, hop(0, 1)).kind == "stale"     # a duplicate
    assert led.duplicates == 3


def test_a_lost_worker_replays_its_frames_and_charges_only_the_running_one():
    led = Ledger(n_stages=2, slots=4, max_failures=2)
    a, b, c = (led.admit(i, 0.0) for i in range(3))
    led.assign(0, worker=1)
    led.assign(0, worker=1)            # a running, b queued behind it on worker 1
    led.assign(0, worker=2)            # c on another worker
    outs = led.on_worker_lost(1)
    assert [(o.kind, o.frame.fid) for o in outs] == [("requeued", a.fid), ("requeued", b.fid)]
    assert (a.failures, b.failures, a.attempt, b.attempt) == (1, 0, 1, 1)
    assert list(led.waiting[0]) == [a.fid, b.fid]           # at the front, in order
    # the old attempt's result (sent just before the worker died) no longer counts
    assert led.on_done(a.fid, 0, 0, 1, hop(0, 1)).kind == "stale"
    # c is untouched
    assert led.on_done(c.fid, 0, 0, 2, hop(0, 2)).kind == "advance"


def test_a_poison_frame_fails_after_two_lost_workers_and_the_others_go_on():
    led = Ledger(n_stages=1, slots=4, max_failures=2)
    poison, other = led.admit("p", 0.0), led.admit("o", 0.0)
    led.assign(0, worker=1)
    led.assign(0, worker=1)
    led.on_worker_lost(1)
    led.assign(0, worker=1)            # the replacement takes the poison frame first again
    led.assign(0, worker=1)
    outs = led.on_worker_lost(1)
    assert [(o.kind, o.frame.fid, o.code) for o in outs] == [("failed", poison.fid, FRAME_FAILED),
                                                             ("requeued", other.fid, None)]
    assert led.poisoned == 1 and "2 times" in outs[0].detail
    led.release(poison.fid)
    r = led.assign(0, worker=3)
    assert r.fid == other.fid and led.on_done(other.fid, 0, 2, 3, hop(0, 3)).kind == "finished"


def test_random_losses_still_answer_every_frame_exactly_once():
    rng = random.Random(5)
    n_stages, workers = 3, {0: [10, 11], 1: [20], 2: [30, 31]}
    led = Ledger(n_stages, slots=6, max_failures=3)
    answered: dict[int, str] = {}
    admitted, target = 0, 300
    held: dict[int, list[int]] = {w: [] for ws in workers.values() for w in ws}
    while len(answered) < target:
        while admitted < target and led.free_slots:
            led.admit(admitted, 0.0)
            admitted += 1
        for st, ws in workers.items():
            for w in ws:
                while led.waiting[st] and len(held[w]) < 2:
                    held[w].append(led.assign(st, w).fid)
        w = rng.choice(list(held))
        if not held[w]:
            continue
        if rng.random() < 0.05:        # the worker dies with what it holds
            held[w] = []
            for o in led.on_worker_lost(w):
                if o.kind == "failed":
                    assert o.frame.fid not in answered
                    answered[o.frame.fid] = "failed"
                    led.release(o.frame.fid)
            continue
        fid = held[w].pop(0)
        rec = led.frames[fid]
        out = led.on_done(fid, rec.stage, rec.attempt, w, hop(rec.stage, w))
        assert out.kind in ("advance", "finished")
        if out.kind == "finished":
            assert fid not in answered
            answered[fid] = "ok"
            led.release(fid)
    assert sorted(answered) == list(range(target))
    assert led.in_flight == 0 and led.free_slots == 6 and led.replayed > 0


# ------------------------------------------------------------------------------------------ dispatcher


def test_a_free_big_core_is_preferred_and_credits_bound_each_worker():
    d = Dispatcher()
    d.add(0, stage=0, predicted_s=0.005, credits=2)   # big
    d.add(1, stage=0, predicted_s=0.010, credits=2)   # little at half speed
    for w in (0, 1):
        d.set_accepting(w, True)
    now = 100.0
    assert d.pick(0, now) == 0
    d.on_dispatch(0, now)
    # big is busy until +5 ms: a second frame finishes at +10 ms there, +10 ms on little: tie -> faster
    assert d.pick(0, now) == 0
    d.on_dispatch(0, now)
    assert d.pick(0, now) == 1                         # big is out of credits
    d.on_dispatch(1, now)
    d.on_dispatch(1, now)
    assert d.pick(0, now) is None and not d.has_credit(0)
    d.on_done(0, now + 0.005, 0.005)
    assert d.pick(0, now + 0.005) == 0


def test_at_saturation_frames_split_in_proportion_to_speed():
    d = Dispatcher()
    speeds = {0: 0.005, 1: 0.010}
    for w, s in speeds.items():
        d.add(w, 0, s)
        d.set_accepting(w, True)
    t, done, running = 0.0, {0: 0, 1: 0}, []     # running: (finish time, worker)
    while t < 10.0:
        while (w := d.pick(0, t)) is not None:
            d.on_dispatch(w, t)
            start = max([f for f, x in running if x == w], default=t)
            running.append((start + speeds[w], w))
        running.sort()
        t, w = running.pop(0)
        d.on_done(w, t, speeds[w])
        done[w] += 1
    assert done[0] / done[1] == pytest.approx(2.0, rel=0.05)


def test_light_load_never_waits_on_the_little_core():
    d = Dispatcher()
    d.add(0, 0, 0.005)
    d.add(1, 0, 0.010)
    for w in (0, 1):
        d.set_accepting(w, True)
    t = 0.0
    for _ in range(100):                          # one frame every 8 ms, big takes 5 ms
        w = d.pick(0, t)
        assert w == 0
        d.on_dispatch(0, t)
        d.on_done(0, t + 0.005, 0.005)
        t += 0.008


def test_measured_speed_replaces_the_prediction():
    d = Dispatcher()
    d.add(0, 0, 0.005)
    d.set_accepting(0, True)
    for i in range(100):
        d.on_dispatch(0, float(i))
        d.on_done(0, i + 0.02, 0.02)
    assert d.workers[0].service_s == pytest.approx(0.02, rel=0.01)


def test_a_busy_big_core_that_finishes_first_takes_the_frame_in_its_second_credit():
    """Earliest expected finish over free credits: the busy big core's second credit when it finishes
    sooner than the idle little core (no idle round trip for the big core between two frames), the
    little core once that is sooner, nothing when every credit is taken."""
    d = Dispatcher()
    d.add(0, 0, 0.005)   # big
    d.add(1, 0, 0.020)   # little (a quarter of the speed)
    for w in (0, 1):
        d.set_accepting(w, True)
    now = 0.0
    assert d.pick(0, now) == 0
    d.on_dispatch(0, now)
    # big busy until +5 ms: a frame finishes there at +10 ms, on the little core at +20 ms
    assert d.pick(0, now) == 0
    d.on_dispatch(0, now)
    # big's credits are taken: the little core (its share of the rate is needed)
    assert d.pick(0, now) == 1
    d.on_dispatch(1, now)
    assert d.pick(0, now) == 1
    d.on_dispatch(1, now)
    assert d.pick(0, now) is None
    # big answers its first frame: its second finishes at +10 ms, a new one there at +15 ms
    d.on_done(0, 0.005, 0.005)
    assert d.pick(0, 0.005) == 0
    d.on_dispatch(0, 0.005)
    d.on_done(1, 0.020, 0.020)
    d.on_done(1, 0.040, 0.020)
    d.on_done(0, 0.010, 0.005)
    d.on_done(0, 0.015, 0.005)
    # later, the big core shows 4x slower (throttled, say): the little core is sooner now
    for _ in range(60):
        d.observe(0, 0.030)
    assert d.pick(0, 0.1) == 1


def test_a_worker_past_its_expected_finish_is_not_taken_for_idle():
    """Two equal workers: one holds a frame past its expected finish, the other is idle. The frame
    goes to the idle one even when the busy one's moving average is a little faster; a big core
    that runs over still beats a little core that would take twice as long."""
    d = Dispatcher()
    d.add(0, 0, 0.0099)
    d.add(1, 0, 0.0100)
    for w in (0, 1):
        d.set_accepting(w, True)
    assert d.pick(0, 0.0) == 0
    d.on_dispatch(0, 0.0)
    assert d.pick(0, 0.012) == 1, "worker 0 is 2 ms over its time: worker 1 is idle"
    big = Dispatcher()
    big.add(0, 0, 0.0087)
    big.add(1, 0, 0.0176)
    for w in (0, 1):
        big.set_accepting(w, True)
    big.on_dispatch(0, 0.0)
    assert big.pick(0, 0.010) == 0, "the big core, 1.3 ms over, still finishes a frame first"
    big.on_dispatch(0, 0.010)
    assert big.workers[0].busy_until >= 0.010 + 0.1 * 0.0087 + 0.0087 - 1e-9
