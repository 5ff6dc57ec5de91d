"""One signal path: SIGTERM and SIGHUP unwind like Ctrl-C, so every owner removes what it made.

`kill`, `timeout` and CI cancellation send SIGTERM, a closed terminal SIGHUP, and Python's
default for both ends the process on the spot: namespaces, rules and echo agents stay
behind and a bench run folder stays "running". Inside `interrupt_on_signals()` SIGINT,
SIGTERM and SIGHUP all raise `Interrupted` (a KeyboardInterrupt) in the main thread, so
the `finally` blocks and context managers that own resources run as they do for Ctrl-C.
Only the first signal raises: later ones are ignored until the block ends, so cleanup is
not cut short. The process then exits 128 + the signal's number, as a shell reports it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived; caught wherever Ctrl-C is."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Caught:
    """The first signal of an `interrupt_on_signals` block, once there was one."""

    signum: int | None = None
    raised: bool = False
    deferring: int = 0  # depth of `interrupts_deferred` blocks under way

    @property
    def exit_status(self) -> int | None:
        return None if self.signum is None else 128 + self.signum

    def interrupt(self) -> None:
        self.raised = True
        raise Interrupted(self.signum)


_active: list[Caught] = []  # the block whose handler is installed (blocks nest)


@contextmanager
def interrupt_on_signals() -> Iterator[Caught]:
    """Turn SIGINT, SIGTERM and SIGHUP into `Interrupted` in this block (main thread only)."""
    if _active or threading.current_thread() is not threading.main_thread():
        # An outer block already handles them; signals reach only the main thread anyway.
        yield _active[-1] if _active else Caught()
        return
    caught = Caught()

    def handler(signum: int, _frame: object) -> None:
        if caught.signum is not None:
            return  # the first signal's cleanup is under way
        caught.signum = signum
        if not caught.deferring:
            caught.interrupt()

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    _active.append(caught)
    try:
        yield caught
    finally:
        _active.pop()
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """A signal during this block raises `Interrupted` once the block is over, not inside it.

    For steps that must not be cut in half: Thread.start and ThreadPoolExecutor.submit wait
    for the new thread, and an interrupt there leaves it running where cleanup never looks.
    """
    caught = _active[-1] if _active and threading.current_thread() is threading.main_thread() else None
    if caught is None:
        yield
        return
    caught.deferring += 1
    try:
        yield
    finally:
        caught.deferring -= 1
    if not caught.deferring and caught.signum is not None and not caught.raised:
        caught.interrupt()
