"""A watchdog for the waits on peers that no host call covers.

The copy-engine transport orders work after peers with stream memory operations
(``cuStreamWaitValue32``): they never time out. The count all-gather that starts every forward
is polled by the host with a deadline, so a peer lost mid-forward ends in ``PeerTimeoutError``
at the next forward. The last forward has no next one: its final wait would hold the next
``torch.cuda.synchronize()`` forever. NCCL covers its own collectives the same way (its
watchdog ends the process after ``timeout``); this covers ours.

``PeerWaitWatchdog.watch(event, what)`` takes an event recorded after the waits of one forward.
A daemon thread checks the oldest watched event; when one has not completed ``timeout_s`` after
it was watched, the watchdog logs which wait it was and ends the process (``on_timeout``,
``os.abort`` by default: the GPU work cannot be cancelled, and a process that returned to its
caller would hang at its next synchronization instead).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Callable, Deque, Optional, Tuple

logger = logging.getLogger(__name__)


def _abort(message: str) -> None:
    logger.critical(message)
    print(message, flush=True)
    os.abort()


class PeerWaitWatchdog:
    """Ends the process when a watched wait for peers does not complete in ``timeout_s``."""

    def __init__(self, timeout_s: float, on_timeout: Optional[Callable[[str], None]] = None,
                 poll_s: float = 0.05):
        self.timeout_s = timeout_s
        self.on_timeout = on_timeout or _abort
        self.poll_s = poll_s
        self._pending: Deque[Tuple[float, object, str]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.fired = False

    def watch(self, event, what: str) -> None:
        """``event``: has ``query()`` (True once complete); ``what``: named in the error."""
        with self._lock:
            self._pending.append((time.monotonic() + self.timeout_s, event, what))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="eps-peer-watchdog",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _run(self) -> None:
        while True:
            with self._lock:
                head = self._pending[0] if self._pending else None
            if head is None:
                self._wake.wait()
                self._wake.clear()
                continue
            deadline, event, what = head
            if event.query():
                with self._lock:
                    self._pending.popleft()
                continue
            if time.monotonic() > deadline:
                self.fired = True
                with self._lock:
                    self._pending.clear()
                self.on_timeout(
                    f"megatron-eps: {what} did not complete within {self.timeout_s:.0f} s; "
                    "another rank of the expert-parallel group has stopped or diverged. The GPU "
                    "work waiting for it cannot be cancelled, so the process ends here (set "
                    "MEGATRON_EPS_WAIT_TIMEOUT_S to wait longer)."
                )
                continue
            time.sleep(self.poll_s)


_WATCHDOG: Optional[PeerWaitWatchdog] = None


def peer_wait_watchdog(timeout_s: float) -> PeerWaitWatchdog:
    """The process's watchdog (created at first use; its timeout follows the latest call)."""
    global _WATCHDOG
    if _WATCHDOG is None:
        _WATCHDOG = PeerWaitWatchdog(timeout_s)
    _WATCHDOG.timeout_s = timeout_s
    return _WATCHDOG


def wait_timeout_s() -> float:
    """Seconds the host waits for a forward's cross-rank work before it gives up
    (``MEGATRON_EPS_WAIT_TIMEOUT_S``, default 600)."""
    return float(os.environ.get("MEGATRON_EPS_WAIT_TIMEOUT_S", "600"))


class PeerTimeoutError(RuntimeError):
    """A wait for the other ranks of the expert-parallel group did not finish in time."""


def wait_for_event(event, timeout_s: float, what: str) -> None:
    """Block the host until ``event`` completes; raise PeerTimeoutError after ``timeout_s``."""
    if event.query():
        return
    deadline = time.monotonic() + timeout_s
    pause = 0.0
    while not event.query():
        if time.monotonic() > deadline:
            raise PeerTimeoutError(
                f"megatron-eps: waited {timeout_s:.0f} s for {what} without completion; another "
                "rank of the expert-parallel group has stopped or diverged (set "
                "MEGATRON_EPS_WAIT_TIMEOUT_S to wait longer)"
            )
        time.sleep(pause)
        pause = min(1e-3, pause + 2e-5)
