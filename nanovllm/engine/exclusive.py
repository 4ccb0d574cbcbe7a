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


class InterruptDeferral:
    """Ctrl-C that arrives inside `deferred()` is raised when the block ends: the scheduler's bookkeeping
    (queues, blocks, ref counts) is never left half-done, so the engine goes on after a KeyboardInterrupt with
    nothing lost. `installed()` puts the handler in place for a whole call, so a step's blocks only flip a
    counter (swapping handlers per block cost 8 us, three times a step). Only SIGINT under Python's default
    handler, in the main thread, where Python runs signal handlers; a program's own handler is left alone."""

    def __init__(self):
        self._depth = 0
        self._pending = False

    def _handler(self, signum, frame):
        if self._depth:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield
            return
        signal.signal(signal.SIGINT, self._handler)
        try:
            yield
        finally:
            # unless the program installed its own meanwhile; a stream closed from another thread leaves it (it
            # acts as the default one outside `deferred()`)
            if threading.current_thread() is threading.main_thread() and \
                    signal.getsignal(signal.SIGINT) == self._handler:
                signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextmanager
    def deferred(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._pending:
                self._pending = False
                raise KeyboardInterrupt
