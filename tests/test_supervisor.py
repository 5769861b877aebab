"""The supervision state machine, without processes: events in, actions out."""

from hetsched.runtime.supervisor import Supervisor


def kinds(actions):
    return [(a.kind, a.key) for a in actions]


def running_supervisor(keys=("a", "b"), **kw):
    sup = Supervisor(**kw)
    for k in keys:
        sup.add(k, 0.0)
        sup.on_running(k, 0.0)
    return sup


def test_dead_worker_is_reported_lost_respawned_then_recovered():
    sup = running_supervisor()
    alive = {"a": True, "b": False}
    sup.on_heartbeat("a", 9.9)
    assert kinds(sup.tick(10.0, alive)) == [("lost", "b"), ("spawn", "b")]
    assert sup.recovering and not sup.degraded
    alive["b"] = True
    assert sup.tick(10.1, alive) == []          # still starting: no replay yet
    sup.on_running("b", 10.2)
    sup.on_heartbeat("a", 10.25)
    assert kinds(sup.tick(10.3, alive)) == [("recovered", None)]
    assert not sup.recovering and sup.restarts == 1 and sup.recoveries == 1


def test_hung_worker_is_killed_and_replaced():
    sup = running_supervisor(heartbeat_timeout=1.0)
    alive = {"a": True, "b": True}
    sup.on_heartbeat("a", 5.0)
    sup.on_heartbeat("b", 4.5)
    assert sup.tick(5.2, alive) == []
    actions = kinds(sup.tick(5.6, alive))
    assert actions == [("kill", "b")]           # not lost until it is seen dead: it could still write
    assert sup.tick(5.65, alive) == []          # the kill has not landed yet
    alive["b"] = False
    assert kinds(sup.tick(5.7, alive)) == [("lost", "b"), ("spawn", "b")]


def test_crash_loop_backs_off_and_reports_degraded():
    sup = running_supervisor(backoff_base=0.5, backoff_max=4.0, degraded_after=3)
    t = 100.0
    delays = []
    for _ in range(5):
        sup.on_heartbeat("a", t)
        actions = sup.tick(t, {"a": True, "b": False})
        spawned_at = t
        while ("spawn", "b") not in kinds(actions):
            t += 0.05
            sup.on_heartbeat("a", t)
            actions = sup.tick(t, {"a": True, "b": False})
        delays.append(round(t - spawned_at, 1))
        sup.on_heartbeat("a", t)
        t += 0.1   # the replacement dies at once (crash on start)
    assert delays[0] == 0.0
    assert delays[1:] == sorted(delays[1:]) and delays[-1] <= 4.1 and delays[-1] >= 2.0
    assert sup.degraded


def test_a_stable_worker_resets_its_crash_count():
    sup = running_supervisor(crash_window=1.0)
    sup.on_heartbeat("a", 1.0)
    sup.tick(1.0, {"a": True, "b": False})
    sup.on_running("b", 1.1)
    sup.mark_stable("b", 10.0)
    assert sup.slots["b"].consecutive_failures == 0


def test_worker_that_never_gets_running_is_killed():
    sup = Supervisor(start_timeout=5.0)
    sup.add("a", 0.0)
    assert kinds(sup.tick(6.0, {"a": True})) == [("kill", "a")]
    assert kinds(sup.tick(6.1, {"a": False})) == [("lost", "a"), ("spawn", "a")]
