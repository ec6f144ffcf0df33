"""The record of the files (or records) a pipeline could not read."""

import threading
import warnings


class SkipCounter:
    """Thread-safe record of the files (or TFRecord records, named
    ``path#index``) a pipeline could not read. ``what`` names them in the
    warning."""

    def __init__(self, what="image file(s)"):
        self._lock = threading.Lock()
        self.paths = set()
        self._warned = 0
        self.what = what

    def add(self, path):
        with self._lock:
            self.paths.add(path)

    @property
    def count(self):
        return len(self.paths)

    def warn_if_new(self):
        """One warning giving the count, when new files were skipped since the
        last call."""
        with self._lock:
            n = len(self.paths)
            if n > self._warned:
                examples = ", ".join(sorted(self.paths)[:3])
                warnings.warn(f"Skipped {n} unreadable {self.what} (e.g. {examples}).", stacklevel=2)
                self._warned = n
        return n
