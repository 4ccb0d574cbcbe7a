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
