"""An exception, wherever it was raised, as the one line the user reads.

Errors raised inside Ray workers reach the driver wrapped: ``RayTaskError`` (``.cause``), an
actor's failed ``__init__`` as ``ActorDiedError`` (the cause only as text), Ray Train's
``WorkerGroupError`` (``.worker_failures``) and ``ControllerError`` (``.controller_failure``),
Tune's ``TuneError`` and result errors, plus Python's own ``__cause__``/``__context__``. The
chain is walked for a :class:`~mirage.errors.MirageError`; its message becomes the line. Any
other exception prints its innermost cause's type and first line. The full trace of a wrapped
or unexpected error goes to ``<outputs>/logs/mirage-<UTC time>-<pid>.log`` and the line names it.

No Ray import: wrappers are recognised by their attributes.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

from mirage.errors import MirageError

PREFIX = "mirage: error: "
LOG_DIR = "logs"
MAX_LINE_CHARS = 500
_CHILD_ATTRS = ("cause", "controller_failure", "base_exception", "error", "__cause__", "__context__")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MIRAGE_IN_TEXT = re.compile(r"mirage\.errors\.(\w+): (.+)")


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps, breadth first, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for attr in _CHILD_ATTRS:
            child = getattr(e, attr, None)
            if isinstance(child, BaseException):
                todo.append(child)
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(v for _, v in sorted(failures.items(), key=lambda kv: str(kv[0])) if isinstance(v, BaseException))
        errors = getattr(e, "errors", None)
        if isinstance(errors, (list, tuple)):
            todo.extend(v for v in errors if isinstance(v, BaseException))


def _is_wrapper(e: BaseException) -> bool:
    """A Ray task error: Ray makes it an instance of its cause's class, with the whole trace as its text."""
    return type(e).__name__.startswith("RayTaskError") or isinstance(getattr(e, "cause", None), BaseException)


def user_error(exc: BaseException) -> MirageError | None:
    """The first :class:`MirageError` in ``exc``'s chain that is not a Ray wrapper of one."""
    for e in chain(exc):
        if isinstance(e, MirageError) and not _is_wrapper(e):
            return e
    return None


def _mirage_error_in_text(exc: BaseException) -> tuple[str, str] | None:
    """``(class name, message)`` of the last ``mirage.errors.X: message`` in the chain's texts."""
    found = None
    for e in chain(exc):
        for m in _MIRAGE_IN_TEXT.finditer(_ANSI.sub("", str(e))):
            found = (m.group(1), m.group(2).strip())
    return found


def innermost(exc: BaseException) -> BaseException:
    """The deepest exception of the chain (the last one reached), Ray wrappers skipped."""
    last = exc
    for e in chain(exc):
        if not _is_wrapper(e):
            last = e
    return last


def first_line(text: str) -> str:
    """The first non-empty line of ``text`` without terminal colours, at most :data:`MAX_LINE_CHARS`."""
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= MAX_LINE_CHARS else line[: MAX_LINE_CHARS - 3] + "..."


def write_log(exc: BaseException, outputs: str | os.PathLike | None) -> Path:
    """Write ``exc``'s full trace (with every wrapped cause's text) under ``<outputs>/logs``; its path.

    Without ``outputs`` (the config was never read) the log goes to the temp folder.
    """
    folder = Path(outputs) / LOG_DIR if outputs else Path(tempfile.gettempdir()) / "mirage-logs"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"mirage-{stamp}-{os.getpid()}.log"
    parts = ["".join(traceback.format_exception(exc))]
    for e in list(chain(exc))[1:]:
        if e is not exc.__cause__ and e is not exc.__context__:
            parts.append(f"--- wrapped {type(e).__module__}.{type(e).__qualname__} ---\n"
                         + "".join(traceback.format_exception(e)))
    path.write_text(_ANSI.sub("", "\n".join(parts)))
    return path


def error_line(exc: BaseException, outputs: str | os.PathLike | None = None) -> str:
    """The one line for ``exc``: ``mirage: error: <message>``, naming the trace log when one is written.

    A :class:`MirageError` raised in this process is the user's mistake: its message alone, no log.
    A MirageError found inside a wrapper (a Ray worker's), or any other exception: the message (or
    ``<type>: <first line>`` of the innermost cause), then ``(full trace: <log path>)``.
    """
    if isinstance(exc, MirageError) and not _is_wrapper(exc):
        return PREFIX + first_line(str(exc))
    found = user_error(exc)
    if found is not None:
        what = first_line(str(found))
    else:
        text = _mirage_error_in_text(exc)
        if text is not None:
            what = first_line(text[1])
        else:
            inner = innermost(exc)
            what = f"{type(inner).__name__}: {first_line(str(inner))}".rstrip(": ")
    try:
        where = f"full trace: {write_log(exc, outputs)}"
    except OSError as e:
        where = f"no trace log: {e}; rerun with --debug for the trace"
    return f"{PREFIX}{what} ({where})"
