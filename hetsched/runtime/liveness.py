"""A worker that is not the coordinator's child ends itself when its control link stays down.

A local worker dies with its parent (PR_SET_PDEATHSIG, ``hetsched.host.process.die_with_parent``).
A worker in a Ray actor has the raylet as its parent, on a host the coordinator may not even run
on, so it follows the link instead: ZMTP heartbeats on its control DEALER (libzmq answers them in
the coordinator's I/O thread, no code of ours there) close the connection when the coordinator's
host stops answering, a socket monitor reports connects and disconnects, and a thread ends the
process once the link has been down for ``timeout_s`` -- SIGTERM to itself first (the worker's own
handler stops it between frames), ``os._exit(3)`` if it is still there ``grace_s`` later. A
coordinator that is killed closes the link at once (the kernel resets the connection); one whose
host vanishes is noticed within the heartbeat timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_MONITOR_STOPPED


class LinkWatch:
    """Watches one connecting socket; call before its ``connect`` and ``close()`` before ``ctx.term()``."""

    def __init__(self, sock: zmq.Socket, timeout_s: float, what: str, grace_s: float = 5.0):
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
        self.timeout_s, self.grace_s, self.what = float(timeout_s), float(grace_s), what
        self._mon = sock.get_monitor_socket(_EVENTS)
        self._stop = threading.Event()
        self.up = False
        self.down_since = time.monotonic()
        self.lost = False
        self._thread = threading.Thread(target=self._run, name="hetsched-link-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._mon.poll(200):
                    ev = recv_monitor_message(self._mon)["event"]
                    if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        self.up = True
                    elif ev == zmq.EVENT_DISCONNECTED and self.up:
                        self.up, self.down_since = False, time.monotonic()
                    elif ev == zmq.EVENT_MONITOR_STOPPED:
                        return
                if not self.up and time.monotonic() - self.down_since > self.timeout_s:
                    self._give_up()
                    return
        except zmq.ZMQError:  # the context is going away: the worker is stopping anyway
            return
        finally:
            self._mon.close(linger=0)

    def _give_up(self) -> None:
        self.lost = True
        log.error("%s: no link to the coordinator for %.0f s: stopping", self.what, self.timeout_s)
        os.kill(os.getpid(), signal.SIGTERM)
        if not self._stop.wait(self.grace_s):
            log.error("%s: still running %.0f s after SIGTERM: exiting", self.what, self.grace_s)
            os._exit(3)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
