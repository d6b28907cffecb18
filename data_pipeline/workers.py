"""Loader worker processes ignore stop signals; the training process alone decides to stop.

A scheduler (`scancel`, systemd, `kill -TERM -PGID`) and Ctrl-C signal the whole process
group. A worker killed by it would end the run with a worker error before the trainer
can checkpoint; a forked worker that inherited the trainer's handler would act on it too.
Workers are stopped by their parent when the loader shuts down.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """Ignore SIGTERM / SIGINT / SIGUSR1 in this process (a torch `worker_init_fn`)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def workers_ignore_stop_signals() -> Iterator[None]:
    """Start worker processes inside this block (fork or spawn): they begin with the stop
    signals ignored (an ignored signal stays ignored across fork and exec), and this
    process's own handlers are back when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only change on the main thread; its children keep them
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
