"""Loader worker processes ignore stop signals; the training process alone decides to stop.

A scheduler (`scancel`, systemd, `kill -TERM -PGID`) and Ctrl-C signal the whole process
group. A worker killed by it would end the run with a worker error before the trainer
can checkpoint; a forked worker that inherited the trainer's handler would act on it too.
Workers are stopped by their parent when the loader shuts down.

Forked torch workers never collect what they inherit: a DALI pipeline left as garbage in
the parent would run its destructor in the child, which waits forever on threads that
fork did not copy (`iterate`). And since workers ignore SIGTERM, which is how Python's
exit hook ends daemonic children, the workers of every loader still running at exit are
shut down the loader's own way first (`_stop_workers`).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import multiprocessing
import signal
import weakref
from collections.abc import Iterable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # the trainer's, and only its


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """Ignore SIGTERM / SIGINT / SIGUSR1 in this process (a torch `worker_init_fn`)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_RUNNING: weakref.WeakSet = weakref.WeakSet()  # torch loader iterators with live workers
_WORKER_PIDS: set[int] = set()  # every torch loader worker started through `iterate`


def iterate(loader: Iterable) -> Iterator:
    """iter(loader), with the objects of this process frozen while it forks its workers: the
    children start with them out of the garbage collector's reach, and never collect them."""
    gc.freeze()
    try:
        iterator = iter(loader)
    finally:
        gc.unfreeze()
    if hasattr(iterator, "_shutdown_workers"):
        _RUNNING.add(iterator)
        _WORKER_PIDS.update(worker.pid for worker in iterator._workers)
    return iterator


@atexit.register  # runs before multiprocessing's own exit hook, registered earlier
def _stop_workers() -> None:
    """Shut live loaders down their own way (the workers exit on the loader's sentinel); a
    torch worker still alive after that, which Python's hook would SIGTERM and wait for
    forever, is killed: a loader that was collected may have lost its sentinel."""
    for iterator in list(_RUNNING):
        iterator._shutdown_workers()
    for child in multiprocessing.active_children():
        if child.pid in _WORKER_PIDS:  # torch's workers, not DALI's
            child.kill()


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
