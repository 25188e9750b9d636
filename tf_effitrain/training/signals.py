"""SIGINT / SIGTERM during training: save a checkpoint, stop cleanly, say how to resume.

The first signal asks the checkpoint callback to save at the next batch end and stop;
a second one interrupts at once (Python's default `KeyboardInterrupt` for SIGINT).
"""

import contextlib
import signal
import threading

__all__ = ["stop_on_signals"]


@contextlib.contextmanager
def stop_on_signals(request_stop, signals=(signal.SIGINT, signal.SIGTERM)):
    """Routes the first of `signals` to `request_stop(name)` while the block runs.

    Only the main thread can install handlers; elsewhere (a notebook's worker thread,
    a test runner's) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        # The next signal acts at once.
        for sig, old in previous.items():
            signal.signal(sig, old)
        request_stop(name)

    for sig in signals:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
