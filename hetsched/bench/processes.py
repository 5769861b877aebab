"""The processes a bench scenario starts: onnxruntime contenders (``workers/bench_worker.py``,
JSON lines on stdin/stdout) and the hetsched service exactly as a user starts it
(``python -m hetsched start --config C --bind ipc://...``). Every one is stopped and reaped by PID
(and dies with the bench: PR_SET_PDEATHSIG)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from hetsched.errors import HetschedError


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    root = repo_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-n:])
    except OSError:
        return ""


class Child:
    """A child process whose stderr (and, unless ``json_stdout``, stdout) goes to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: str, *, json_stdout: bool,
                 env: dict | None = None, pass_fds: tuple[int, ...] = ()):
        from hetsched.host.process import die_with_parent
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "w", encoding="utf-8")
        parent = os.getpid()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if json_stdout else subprocess.DEVNULL,
            stdout=subprocess.PIPE if json_stdout else self._log, stderr=self._log, text=True, bufsize=1,
            cwd=repo_root(), env=env or _env(), pass_fds=pass_fds, preexec_fn=lambda: die_with_parent(parent))
        self._q: "queue.Queue" = queue.Queue()
        if json_stdout:
            threading.Thread(target=self._reader, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _reader(self) -> None:
        try:
            for line in self.proc.stdout:
                self._q.put(line)
        finally:
            self._q.put(None)

    def read(self, timeout: float) -> dict:
        """The next JSON line on stdout (an ``{"type": "error"}`` line raises)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise HetschedError(f"{self.name}: no reply within {timeout:.0f} s\n{tail(self.log_path)}") from None
            if line is None:
                self.proc.wait(5)
                raise HetschedError(f"{self.name}: exited with code {self.proc.returncode}\n{tail(self.log_path)}")
            line = line.strip()
            if line.startswith("{"):
                msg = json.loads(line)
                if msg.get("type") == "error":
                    raise HetschedError(f"{self.name}: {msg.get('error')}\n{tail(self.log_path)}")
                return msg

    def send(self, **cmd: Any) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def stop(self, grace: float = 15.0) -> None:
        """Ask (a quit line, or SIGINT), wait, then SIGKILL; always reaped."""
        p = self.proc
        try:
            if p.poll() is None:
                if p.stdin is not None:
                    try:
                        p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                        p.stdin.close()
                    except (BrokenPipeError, OSError, ValueError):
                        pass
                else:
                    p.send_signal(signal.SIGINT)
                try:
                    p.wait(grace)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        finally:
            self._log.close()


class OrtProc(Child):
    """One onnxruntime contender process (its sessions as threads); ``due_fd``: the read end of the
    contender's due pipe (open-loop frames, see workers/bench_worker.py). Started at once; call
    :meth:`wait_ready` before commanding it."""

    def __init__(self, name: str, sessions: list[dict], spec: dict, tmp: str, due_fd: int):
        spec = {**spec, "sessions": sessions, "parent_pid": os.getpid(), "due_fd": due_fd}
        spec_path = os.path.join(tmp, f"{name}.json")
        with open(spec_path, "w", encoding="utf-8") as fh:
            json.dump(spec, fh)
        super().__init__(name, [sys.executable, "-m", "workers.bench_worker", "ort", spec_path],
                         os.path.join(tmp, f"{name}.log"), json_stdout=True, pass_fds=(due_fd,))
        self.sessions = sessions
        self.ready: dict | None = None

    def wait_ready(self, timeout: float = 180.0) -> dict:
        self.ready = self.read(timeout)
        return self.ready

    def command(self, timeout: float, **cmd: Any) -> dict:
        self.send(**cmd)
        return self.read(timeout)


class ServiceProc(Child):
    """``python -m hetsched start --config CONFIG --bind ipc://TMP/s.sock`` with HETSCHED_CACHE_DIR
    pointing at a fresh directory (a first-time user: the service profiles the cores itself)."""

    def __init__(self, config_path: str, tmp: str):
        self.socket_path = os.path.join(tmp, "s.sock")
        self.endpoint = f"ipc://{self.socket_path}"
        cache = os.path.join(tmp, "cost-cache")
        os.makedirs(cache, exist_ok=True)
        super().__init__("hetsched start", [sys.executable, "-m", "hetsched", "start", "--config", config_path,
                                            "--bind", self.endpoint],
                         os.path.join(tmp, "service.log"), json_stdout=False, env=_env(HETSCHED_CACHE_DIR=cache))

    def wait_ready(self, timeout: float = 900.0) -> None:
        """Until the service's client socket exists (it profiles and plans first)."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket_path):
            if self.proc.poll() is not None:
                raise HetschedError(f"hetsched start exited with code {self.proc.returncode} before serving:\n"
                                    f"{tail(self.log_path, 25)}")
            if time.monotonic() > deadline:
                raise HetschedError(f"hetsched start did not bind {self.endpoint} within {timeout:.0f} s:\n"
                                    f"{tail(self.log_path, 25)}")
            time.sleep(0.1)
