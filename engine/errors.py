"""Finding the engine's own error inside what Ray hands back.

An error raised in a Ray task, a Ray Data operator or a Ray Train worker reaches the driver wrapped
(RayTaskError, UserCodeException, WorkerGroupError, ...). The engine's errors carry one line that names
the thing (a URI, a file, a key); `find_cause` digs it out so a stage can fail with that line.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, TypeVar

E = TypeVar("E", bound=BaseException)


def chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every error under it, outermost first: causes, contexts, Ray's `.cause`, Train's worker and
    controller failures."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        err = todo.pop(0)
        if id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        nested = [err.__cause__, err.__context__, getattr(err, "cause", None),
                  getattr(err, "controller_failure", None)]
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict):
            nested += list(failures.values())
        todo += [n for n in nested if isinstance(n, BaseException)]


def find_cause(exc: BaseException, kind: type[E]) -> E | None:
    """The innermost `kind` in `exc`'s chain.

    Innermost, because Ray re-raises a task's error as a class deriving from both RayTaskError and the
    error's own class, whose text is a whole traceback; the original below it holds the one line."""
    found: E | None = None
    for err in chain(exc):
        if isinstance(err, kind):
            found = err
    return found


@contextmanager
def surfaced(kind: type[E]) -> Iterator[None]:
    """Inside the block, an error wrapping a `kind` (raised in a task, operator or worker) is re-raised as a
    plain `kind` with the original's first line, so the stage fails with the line that names the thing."""
    try:
        yield
    except Exception as exc:  # re-raised as it is unless it wraps a `kind`
        cause = find_cause(exc, kind)
        if cause is None or cause is exc:
            raise
        raise kind(str(cause).splitlines()[0]) from exc


def raise_original_errors() -> None:
    """Ray Data map tasks created in this process raise the function's own exception: wrapped in a
    UserCodeException its cause would not survive the trip to the driver (exceptions pickle without
    their chain), and with it the one line naming the URI or file."""
    import ray.data

    ray.data.DataContext.get_current().raise_original_map_exception = True
