"""hetsched on a real two-node Ray cluster (scripts/ray_local_cluster.sh: two raylets on this
machine, nodes board-a on 127.0.0.2 and board-b on 127.0.0.3): every node's topology detected on the
node, the real SqueezeNet served across both nodes through the socket (stage workers are Ray actors
pinned to their cluster's cores, profiled on their node, shared memory on the coordinator's node and
tcp:// + CURVE to the other), outputs equal to the unsplit model, a SIGKILLed stage actor restarted
with no frame lost, and nothing of ours left on the cluster after a stop or a killed coordinator."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import psutil
import pytest

from hetsched.client import Client

from .conftest import ROOT, SHARED_IMAGES, SHARED_LABELS, SHARED_MODEL, wait_for
from .test_lifecycle import start_service
from .test_video import stop_service

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'hetsched[ray]')")

SCRIPT = ROOT / "scripts" / "ray_local_cluster.sh"
PORT = 27379  # not the script's default: a developer's own local cluster may run meanwhile
NODE_DIRS = {"board-a": "board-a", "board-b": "board-b"}


def cluster_env(state_dir: str) -> dict:
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    return {**os.environ, "HETSCHED_RAY_DIR": state_dir, "HETSCHED_RAY_PORT": str(PORT), "RAY": ray_bin}


def group_processes(state_dir: str) -> list[psutil.Process]:
    """Every process of the cluster's two process groups (raylets, GCS, agents, Ray workers)."""
    pgids = set()
    for name in NODE_DIRS:
        try:
            with open(os.path.join(state_dir, f"{name}.pid")) as fh:
                pgids.add(int(fh.read()))
        except (OSError, ValueError):
            pass
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) in pgids and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def raylets_of(state_dir: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if p.info["name"] == "raylet" and state_dir in " ".join(p.info["cmdline"] or ()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def stage_actors() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if " ".join(p.info["cmdline"] or ()).startswith("ray::StageActor"):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    state_dir = tempfile.mkdtemp(prefix="hsray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = cluster_env(state_dir)
    r = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=180)
    try:
        if r.returncode != 0:
            pytest.skip(f"cannot start a local Ray cluster here: {r.stderr.strip()[-800:]}")
        yield state_dir
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=180)
        try:
            wait_for(lambda: not group_processes(state_dir) and not raylets_of(state_dir), timeout=30,
                     what="the local Ray cluster to stop")
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)


def config(labels: bool = True, measure: bool = True, extra: str = "") -> str:
    return (f"model: {SHARED_MODEL}\n"
            f"placement: {{engine: ray, address: '127.0.0.2:{PORT}', node_ip: 127.0.0.2, orphan_timeout_s: 5}}\n"
            "clusters:\n  a_core: {node: board-a, cores: [0]}\n  b_core: {node: board-b, cores: [1]}\n"
            "planner: {max_stages: 2, allow_pools: false, replan: {enabled: false}}\n"
            f"profile: {{measure: {str(measure).lower()}, repeats: 5, warmup: 1, refine: 0, cache: false}}\n"
            + (f"input: {{labels: {SHARED_LABELS}}}\n" if labels else "") + extra)


def snapshot(sock: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "hetsched", "status", "--connect", sock, "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def workers_of(snap: dict) -> list[dict]:
    return [dict(w, stage=s["stage"]) for s in snap["stages"] for w in s["workers"]]


def node_of(pid: int) -> str:
    """The Ray node a worker process runs under: its parent is that node's raylet, whose command line
    names the node's own temp dir."""
    raylet = psutil.Process(pid).parent()
    cmd = " ".join(raylet.cmdline())
    assert raylet.name() == "raylet", (pid, raylet.name())
    return next(n for n, d in NODE_DIRS.items() if f"/{d}/" in cmd)


def allowed_cpus(pid: int) -> str:
    with open(f"/proc/{pid}/status") as fh:
        return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("Cpus_allowed_list"))


def top1(reply: dict) -> int:
    assert reply["type"] == "result", reply
    return reply["top_k"][0]["index"]


def unsplit_model(x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(SHARED_MODEL), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.timeout(180)
def test_topology_ray_lists_every_nodes_clusters(ray_cluster):
    r = subprocess.run([sys.executable, "-m", "hetsched", "topology", "--ray", "--json", "--address",
                        f"127.0.0.2:{PORT}", "--node-ip", "127.0.0.2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    nodes = {n["node"]: n for n in out["nodes"]}
    assert sorted(nodes) == ["board-a", "board-b"]
    assert (nodes["board-a"]["ip"], nodes["board-b"]["ip"]) == ("127.0.0.2", "127.0.0.3")
    mine = sorted(os.sched_getaffinity(0))
    for n in nodes.values():
        assert n["clusters"] and sorted(c for cl in n["clusters"] for c in cl["cores"]) == n["online"]
        assert set(n["allowed"]) >= set(mine) & set(n["online"])
    assert out["coordinator_ip"] == "127.0.0.2"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("clusters, message", [
    ("  a_core: {node: board-a, cores: [0]}\n  b_core: {node: board-b, cores: [7]}\n",
     "clusters.b_core.cores[0]: core 7 does not exist on node board-b"),
    ("  a_core: {node: board-a, cores: [0]}\n  b_core: {node: board-b, cores: [1], speed: 0.5}\n",
     "clusters.b_core.speed: emulated speeds run on the coordinator's node only (node board-a)"),
    ("  a_core: {node: board-z, cores: [0]}\n",
     "clusters.a_core.node: no alive Ray node declares hetsched_node_board-z (nodes: board-a, board-b)"),
])
def test_clusters_are_checked_against_their_node(ray_cluster, tmp_path, clusters, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(config(labels=False, measure=False).replace(f"model: {SHARED_MODEL}", "model: builtin:squeezenet1.1")
                   .replace("  a_core: {node: board-a, cores: [0]}\n  b_core: {node: board-b, cores: [1]}\n", clusters))
    r = subprocess.run([sys.executable, "-m", "hetsched", "plan", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr


@pytest.mark.timeout(600)
def test_real_model_across_two_nodes_with_a_killed_actor(ray_cluster, tmp_path):
    if not SHARED_MODEL.is_file():
        pytest.skip(f"shared model not present at {SHARED_MODEL}")
    proc, sock, lines = start_service(tmp_path, config())
    stopped = False
    try:
        log = "".join(lines)
        assert "profiling cluster a_core (cores [0]) on Ray node board-a" in log, log
        assert "profiling cluster b_core (cores [1]) on Ray node board-b" in log, log
        assert "links to the coordinator (127.0.0.2): board-b:" in log, log
        # every worker is a Ray actor on its cluster's node, pinned (all its threads) to the cluster's cores
        snap = snapshot(sock)
        workers = workers_of(snap)
        assert len(snap["stages"]) == 2 and len(workers) == 2
        where = {w["cluster"]: (node_of(w["pid"]), allowed_cpus(w["pid"])) for w in workers}
        assert where == {"a_core": ("board-a", "0"), "b_core": ("board-b", "1")}, where
        assert {w["cluster"]: w["node"] for w in workers} == {"a_core": "board-a", "b_core": "board-b"}  # as stats say
        for w in workers:
            assert {allowed_cpus(int(t)) for t in os.listdir(f"/proc/{w['pid']}/task")} == {str(w["cores"][0])}
        # the real model through the socket: cats and espresso
        photos = {n: (SHARED_IMAGES / n).read_bytes() for n in ("chelsea.jpg", "coffee.jpg")}
        with Client(sock, timeout=60) as c:
            for n, data in photos.items():
                c.submit(data, stream=n)
            got = {r["stream"]: top1(r) for r in c.replies(2, timeout=60)}
            assert got["chelsea.jpg"] in (281, 282, 285) and got["coffee.jpg"] == 967, got
            # raw tensors: the split model's outputs equal the unsplit model's
            rng = np.random.default_rng(3)
            xs = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(3)]
            for x in xs:
                c.submit(x, stream="raw", want_outputs=True)
            for x, r in zip(xs, c.replies(3, timeout=60)):
                assert r["type"] == "result", r
                assert np.abs(r["arrays"][0] - unsplit_model(x)).max() <= 1e-4
            # SIGKILL the actor on the other node while frames flow: all come back, once each, in order
            victim = next(w for w in workers if w["cluster"] == "b_core")
            n = 60
            for i in range(n):
                c.submit(photos["coffee.jpg"], stream="kill")
            replies = []
            for r in c.replies(n, timeout=120):
                replies.append(r)
                if len(replies) == 10:
                    os.kill(victim["pid"], signal.SIGKILL)
        assert [r["seq"] for r in replies] == list(range(n))
        assert all(top1(r) == 967 for r in replies)
        snap = wait_for(lambda: (s := snapshot(sock))["supervision"]["restarts"] == 1
                        and not s["supervision"]["recovering"] and s, timeout=60, what="the restart")
        again = {w["cluster"]: w["pid"] for w in workers_of(snap)}
        assert again["b_core"] != victim["pid"] and not psutil.pid_exists(victim["pid"])
        assert (node_of(again["b_core"]), allowed_cpus(again["b_core"])) == ("board-b", "1")
        assert snap["completed"] >= n + 5 and snap["errors"] == 0, snap
        assert snap["supervision"]["replayed"] >= 1, snap["supervision"]   # the victim held frames: replayed
        print(f"killed pid {victim['pid']}: restarted as {again['b_core']}, "
              f"{snap['supervision']['replayed']} frame(s) replayed, recovery {snap['supervision']['recovery_times_s']} s")
        actors = [w["pid"] for w in workers_of(snap)]
        stop_service(proc)
        stopped = True
        assert proc.returncode == 0, "".join(lines)
        wait_for(lambda: not any(psutil.pid_exists(p) for p in actors) and not stage_actors(), timeout=30,
                 what="the stage actors to go")
    finally:
        if not stopped:
            stop_service(proc)


@pytest.mark.timeout(300)
def test_a_killed_coordinator_leaves_no_actor(ray_cluster, tmp_path):
    proc, sock, lines = start_service(tmp_path, config(labels=False, measure=False).replace(
        f"model: {SHARED_MODEL}", "model: builtin:squeezenet1.1"))
    try:
        pids = [w["pid"] for w in workers_of(snapshot(sock))]
        assert len(pids) == 2 and {node_of(p) for p in pids} == {"board-a", "board-b"}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not any(psutil.pid_exists(p) for p in pids) and not stage_actors(), timeout=30,
                 what="the actors of a killed coordinator to go")
        # what they left on their nodes (their model files) goes at the next start, when every node is asked
        # for its topology
        tmp = tempfile.gettempdir()
        left = [d for d in os.listdir(tmp) if any(d.startswith(f"hetsched-actor-{p}-") for p in pids)]
        dead, alive = f"hetsched-actor-{proc.pid}-test", f"hetsched-actor-{os.getpid()}-test"  # planted
        for d in (dead, alive):
            os.makedirs(os.path.join(tmp, d, "x"))
        r = subprocess.run([sys.executable, "-m", "hetsched", "topology", "--ray", "--address", f"127.0.0.2:{PORT}",
                            "--node-ip", "127.0.0.2"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert not [d for d in left + [dead] if os.path.exists(os.path.join(tmp, d))]
        assert os.path.isdir(os.path.join(tmp, alive))  # a live process's directory stays
        shutil.rmtree(os.path.join(tmp, alive))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
