"""Stage workers as Ray actors: a launcher for ``hetsched.runtime.pipeline.Pipeline``.

Each worker is one actor on its cluster's node (``hetsched_node_<name>`` resource). The actor's
process *is* the worker: its ``run`` method (Ray runs it on the process's main thread) writes the
stage's sub-model to a private directory on the node, pins every thread of the process to the
worker's cores, then calls ``hetsched.runtime.worker.main`` -- which pins again and only then
creates its zmq context and onnxruntime session, exactly as a local worker does. The spec it gets
carries ``orphan_timeout``: not being the coordinator's child, the worker exits when its control
link is down (``hetsched.runtime.liveness``); Ray also ends the actor when its owner, the
coordinator, exits.

The coordinator sees a worker through :class:`RayWorkerProcess`, which looks like a
``multiprocessing.Process`` to the supervisor: ``is_alive`` asks, without waiting, whether the
actor's ``run`` call has finished (it finishes with the worker's exit code, or fails when the
process died: a SIGKILL is noticed by Ray within milliseconds), ``kill`` is ``ray.kill``. A lost
worker is restarted by our supervisor through the same launcher (a new actor on the same node) and
the frame ledger replays its frames.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import signal
import tempfile
from typing import Any, Mapping

from hetsched.errors import HetschedError
from hetsched.placement.nodes import RayNode
from hetsched.runtime.spec import WorkerSpec

log = logging.getLogger(__name__)

MODEL_DIR_PREFIX = "hetsched-actor-"
DIED = -signal.SIGKILL  # exit code reported for an actor whose process died (killed, crashed, node lost)


def pin_process(cores) -> None:
    """Pin every thread of this process to ``cores`` (a Ray worker runs threads of its own before
    our code does; threads started later inherit the calling thread's set)."""
    cores = set(cores)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # the thread ended meanwhile
            pass
    os.sched_setaffinity(0, cores)


def sweep_model_dirs(base: str) -> None:
    """Remove model directories of actor processes that are gone (a SIGKILL leaves its directory)."""
    for name in os.listdir(base):
        if not name.startswith(MODEL_DIR_PREFIX):
            continue
        try:
            pid = int(name[len(MODEL_DIR_PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        except (ValueError, PermissionError):
            pass


class StageActor:
    """The body of the Ray actor (``ray.remote`` is applied in :func:`actor_class`)."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, spec: WorkerSpec, model: bytes) -> int:
        base = tempfile.gettempdir()
        sweep_model_dirs(base)
        workdir = tempfile.mkdtemp(prefix=f"{MODEL_DIR_PREFIX}{os.getpid()}-", dir=base)
        try:
            path = os.path.join(workdir, os.path.basename(spec.model_path))
            with open(path, "wb") as fh:
                fh.write(model)
            pin_process(spec.cores)
            from hetsched.runtime.worker import main
            return main(dataclasses.replace(spec, model_path=path))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def actor_class():
    import ray
    return ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(StageActor)


class RayWorkerProcess:
    """A worker in a Ray actor, as the supervisor sees a process (multiprocessing.Process-like)."""

    def __init__(self, ray: Any, actor: Any, pid_ref: Any, run_ref: Any, node: RayNode, name: str):
        self._ray, self._actor, self._pid_ref, self._run_ref = ray, actor, pid_ref, run_ref
        self.node, self.name = node, name
        self._pid: int | None = None
        self._exitcode: int | None = None
        self.reason = ""

    @property
    def pid(self) -> int | None:
        """The actor process's pid (known once the actor runs; asked without a long wait)."""
        if self._pid is None:
            try:
                self._pid = int(self._ray.get(self._pid_ref, timeout=1.0))
            except Exception:  # not started yet (or never will): no pid to report
                return None
        return self._pid

    def _finished(self, timeout: float | None) -> bool:
        if self._exitcode is not None:
            return True
        ready, _ = self._ray.wait([self._run_ref], timeout=timeout)
        if not ready:
            return False
        try:
            code = self._ray.get(self._run_ref)
            self._exitcode = int(code) if code is not None else 0
        except self._ray.exceptions.RayActorError as exc:
            self._exitcode, self.reason = DIED, str(exc).strip().splitlines()[0]
        except self._ray.exceptions.RayTaskError as exc:
            self._exitcode, self.reason = 1, str(exc).strip().splitlines()[0]
        self._release()
        return True

    def _release(self) -> None:
        try:
            self._ray.kill(self._actor, no_restart=True)  # the process that ran the worker goes too
        except Exception as exc:  # already gone
            log.debug("releasing actor of %s: %s", self.name, exc)

    def is_alive(self) -> bool:
        return not self._finished(0)

    @property
    def exitcode(self) -> int | None:
        self._finished(0)
        return self._exitcode

    def join(self, timeout: float | None = None) -> None:
        self._finished(timeout)

    def kill(self) -> None:
        self._release()

    def terminate(self) -> None:
        """No signal reaches a process on another host: the pipeline's STOP message is the graceful
        stop, and this ends the actor."""
        self._release()


class RayLauncher:
    """``launcher(spec)`` for the Pipeline: a new actor on the node of ``spec.cluster``."""

    def __init__(self, cluster_nodes: Mapping[str, RayNode], orphan_timeout: float):
        import ray
        self._ray = ray
        self.cluster_nodes = dict(cluster_nodes)
        self.orphan_timeout = float(orphan_timeout)
        self._models: dict[tuple, Any] = {}
        self.started: list[RayWorkerProcess] = []

    def _model_ref(self, path: str) -> Any:
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
        ref = self._models.get(key)
        if ref is None:
            with open(path, "rb") as fh:
                ref = self._models[key] = self._ray.put(fh.read())
        return ref

    def __call__(self, spec: WorkerSpec) -> RayWorkerProcess:
        node = self.cluster_nodes.get(spec.cluster)
        if node is None:
            raise HetschedError(f"{spec.name}: cluster {spec.cluster!r} is on no Ray node "
                                f"(placed clusters: {', '.join(sorted(self.cluster_nodes))})")
        spec = dataclasses.replace(spec, orphan_timeout=self.orphan_timeout)
        actor = actor_class().options(**node.placement()).remote()
        proc = RayWorkerProcess(self._ray, actor, actor.pid.remote(), actor.run.remote(spec, self._model_ref(spec.model_path)),
                                node, spec.name)
        self.started = [p for p in self.started if p._exitcode is None] + [proc]
        log.info("%s: Ray actor on node %s (%s), cores %s", spec.name, node.name, node.ip, list(spec.cores))
        return proc
