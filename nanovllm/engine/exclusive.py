import signal
import threading
from contextlib import contextmanager


class OneCallAtATime:
    """Serves calls from several threads one after the other; a call made from inside another call of the same
    thread (generate inside its own stream loop) is refused, where waiting for the lock would never end."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: int | None = None

    @contextmanager
    def __call__(self):
        if self._owner == threading.get_ident():
            raise RuntimeError("this LLM is already busy in this thread (generate or step called from inside "
                               "its own generate/stream loop); finish or close that loop first")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None


@contextmanager
def interrupts_deferred():
    """Ctrl-C (SIGINT with Python's default handler) that arrives inside the block is raised when the block ends:
    the scheduler's bookkeeping (queues, blocks, ref counts) is never left half-done, so the engine goes on after a
    KeyboardInterrupt with nothing lost. Other threads, and other handlers the program installed, are left as
    they are (Python runs signal handlers in the main thread only)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if caught:
            raise KeyboardInterrupt
