"""Loader worker processes ignore stop signals; the training process alone decides to stop.

A scheduler (`scancel`, systemd, `kill -TERM -PGID`) and Ctrl-C signal the whole process
group. A worker killed by it would end the run with a worker error before the trainer
can checkpoint; a forked worker that inherited the trainer's handler would act on it too.
Workers are stopped by their parent when the loader shuts down.

Forked torch workers never collect what they inherit: a DALI pipeline left as garbage in
the parent would run its destructor in the child, which waits forever on threads that
fork did not copy (`iterate`).
"""

from __future__ import annotations

import contextlib
import gc
import signal
from collections.abc import Iterable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """Ignore SIGTERM / SIGINT / SIGUSR1 in this process (a torch `worker_init_fn`)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def iterate(loader: Iterable) -> Iterator:
    """iter(loader), with the objects of this process frozen while it forks its workers: the
    children start with them out of the garbage collector's reach, and never collect them."""
    gc.freeze()
    try:
        return iter(loader)
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def workers_ignore_stop_signals() -> Iterator[None]:
    """Start worker processes inside this block (fork or spawn): the stop signals are blocked
    on this thread meanwhile, and children inherit the mask (across fork and exec), so they
    never receive them; a signal sent to this process meanwhile stays pending and arrives
    when the block ends, so none is lost."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
