"""The stdout lines of a child process, read by a thread, awaited with a deadline.

Why a thread and a queue: select() on the pipe would miss lines already sitting in the
reader's buffer, and waiting for a child's "ready" line must have a deadline without
sleeping. Used by the demo (deploy/demo.py) and the tests to wait for ``steerd: ready`` and
the SDK's JSON "ready" line.
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Callable


class Lines:
    """Every stdout line of ``proc`` (text mode), in order; None once the stream ended."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        stream = proc.stdout
        assert stream is not None, "start the child with stdout=subprocess.PIPE"

        def pump() -> None:
            for line in stream:
                self._queue.put(line)
            self._queue.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def get(self, timeout: float) -> str | None:
        """The next line within ``timeout`` seconds; None on timeout or end of stream."""
        try:
            return self._queue.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def wait_for(self, pred: Callable[[str], bool], timeout: float) -> str | None:
        """The first line satisfying ``pred`` within ``timeout`` (earlier lines are
        dropped); None on timeout or end of stream."""
        deadline = time.monotonic() + timeout
        while (line := self.get(deadline - time.monotonic())) is not None:
            if pred(line):
                return line
        return None
