"""Run a stage in a background thread while a test acts on the world around it (pauses a store, ...)."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from engine.storage import Storage


class Background:
    """`fn()` in a daemon thread; `join()` returns its result or raises its exception, and times it."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # handed to the test by join()
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the background stage did not finish within {timeout:g} s")
        if self.error is not None:
            raise self.error
        return self.result


def wait_until(condition: Callable[[], bool], job: Background, what: str, timeout: float = 300.0,
               poll_s: float = 0.1) -> None:
    """Poll `condition` until it holds; fails if the job ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if job.done:
            job.join(0)
            raise AssertionError(f"the job finished before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(poll_s)


def wait_for_files(storage: Storage, uri: str, predicate: Callable[[str], bool], count: int, job: Background,
                   timeout: float = 300.0) -> None:
    """Poll `uri` (recursively) until `count` files satisfy `predicate`; fails if the job ends first."""
    def enough() -> bool:
        found = storage.walk_files(uri) if storage.exists(uri) else []
        return sum(1 for f in found if predicate(f)) >= count

    wait_until(enough, job, f"{count} matching file(s) under {uri}", timeout)
