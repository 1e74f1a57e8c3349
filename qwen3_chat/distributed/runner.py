"""The one thread that talks to the ring: graphs are built and evaluated there in order,
and callers wait with a deadline, so a dead or hung rank never hangs the caller.

MLX streams belong to the thread that made them, so a graph is built on the thread that
evaluates it; Ctrl-C reaches the waiting caller at once (the step finishes behind it).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import mlx.core as mx


class Pending:
    def __init__(self) -> None:
        self._done = threading.Event()
        self._box: list[Any] = []

    def _finish(self, value: Any) -> None:
        self._box.append(value)
        self._done.set()

    def wait(self, timeout: float | None) -> tuple[bool, Any]:
        """(finished in time, the job's result); the job's errors are re-raised here."""
        if not self._done.wait(timeout):
            return False, None
        if isinstance(self._box[0], BaseException):
            raise self._box[0]
        return True, self._box[0]


class Runner:
    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name="qwen3-ring").start()

    def _loop(self) -> None:
        stream = mx.new_stream(mx.default_device())
        while True:
            job, pending = self._jobs.get()
            try:
                with mx.stream(stream):
                    result = job()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                result = e
            pending._finish(result)

    def submit(self, job: Callable[[], Any]) -> Pending:
        pending = Pending()
        self._jobs.put((job, pending))
        return pending
