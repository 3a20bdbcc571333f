"""The watchdog that ends a process whose peers never answer (comm/watchdog.py)."""

import threading
import time

from megatron_eps.comm.watchdog import PeerWaitWatchdog


class FakeEvent:
    def __init__(self, done=False):
        self.done = done

    def query(self):
        return self.done


def _wait_until(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_completed_waits_are_dropped_and_nothing_fires():
    fired = []
    dog = PeerWaitWatchdog(0.2, on_timeout=fired.append, poll_s=0.01)
    events = [FakeEvent() for _ in range(3)]
    for i, e in enumerate(events):
        dog.watch(e, f"forward {i}")
    for e in events:
        e.done = True
    assert _wait_until(lambda: dog.pending() == 0)
    time.sleep(0.3)
    assert fired == [] and not dog.fired


def test_a_wait_that_never_completes_fires_once_naming_it():
    fired = []
    dog = PeerWaitWatchdog(0.1, on_timeout=fired.append, poll_s=0.01)
    dog.watch(FakeEvent(done=True), "forward 0")
    dog.watch(FakeEvent(done=False), "forward 1 on EP rank 3")
    assert _wait_until(lambda: len(fired) == 1)
    assert "forward 1 on EP rank 3" in fired[0] and "MEGATRON_EPS_WAIT_TIMEOUT_S" in fired[0]
    time.sleep(0.2)
    assert len(fired) == 1 and dog.fired


def test_a_late_but_completed_wait_does_not_fire():
    fired = []
    dog = PeerWaitWatchdog(0.5, on_timeout=fired.append, poll_s=0.01)
    event = FakeEvent()
    dog.watch(event, "slow forward")
    threading.Timer(0.2, lambda: setattr(event, "done", True)).start()
    assert _wait_until(lambda: dog.pending() == 0)
    time.sleep(0.5)
    assert fired == []
