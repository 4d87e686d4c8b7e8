"""Progress bars on stderr for long calls (``accumulate``, ``evaluate_dataset``, the CLI).

A call's ``progress=`` argument is one of

- ``None`` (the default): a bar when ``sys.stderr`` is a terminal, nothing otherwise (for
  ``accumulate`` and ``evaluate_dataset``; the evaluation calls show none by default);
- ``True``: a bar on stderr whether or not it is a terminal;
- ``False``: nothing;
- a callable ``progress(done_elements, total_elements_or_None)``: called instead of a bar.

The bar is drawn by ``tqdm`` when it is installed (``pip install "lossd[progress]"``), else by
a small built-in renderer with the same text. It is thread-safe (replica threads and gRPC's
sending thread report progress), appears only once there is unfinished work to show (a call
done in one request draws none) and is closed when the call ends, successfully or not.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional, TextIO, Union

__all__ = ["ProgressArg", "progress_reporter", "wants_bar"]

#: What a ``progress=`` argument accepts.
ProgressArg = Union[None, bool, Callable[[int, Optional[int]], None]]

_MIN_INTERVAL_S = 0.1
_FORMAT = ("{desc}: {n_fmt}/{total_fmt} elements ({percentage:.1f}%) |{bar}| "
           "[{elapsed}<{remaining}, {rate_fmt}]")
_FORMAT_UNKNOWN = "{desc}: {n_fmt} elements [{elapsed}, {rate_fmt}]"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def wants_bar(progress: ProgressArg, auto: bool = True, stream: Optional[TextIO] = None
              ) -> bool:
    """Whether ``progress`` asks for a bar: True, or None with ``auto`` on a terminal."""
    if progress is True:
        return True
    if progress is None and auto:
        return _isatty(sys.stderr if stream is None else stream)
    return False


def _si(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 999.5:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.3g}{unit}"
        n /= 1000.0
    return f"{n:.3g}P"


class _TextBar:
    """The built-in renderer (no tqdm): one line, redrawn with a carriage return."""

    def __init__(self, stream: TextIO, desc: str) -> None:
        self.stream = stream
        self.desc = desc
        self.start = time.monotonic()
        self.last = 0.0
        self.done = 0
        self.total: Optional[int] = None
        self.width = 0

    def update(self, done: int, total: Optional[int], force: bool = False) -> None:
        self.done, self.total = done, total if total is not None else self.total
        now = time.monotonic()
        if not force and now - self.last < _MIN_INTERVAL_S:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = f"{_si(self.done / elapsed)} elements/s"
        if self.total:
            pct = 100.0 * self.done / self.total
            filled = int(20 * min(1.0, self.done / self.total))
            text = (f"{self.desc}: {_si(self.done)}/{_si(self.total)} elements ({pct:.1f}%) "
                    f"|{'#' * filled}{' ' * (20 - filled)}| [{elapsed:.1f}s, {rate}]")
        else:
            text = f"{self.desc}: {_si(self.done)} elements [{elapsed:.1f}s, {rate}]"
        pad = " " * max(0, self.width - len(text))
        self.width = len(text)
        self.stream.write("\r" + text + pad)
        self.stream.flush()

    def close(self) -> None:
        self.update(self.done, self.total, force=True)
        self.stream.write("\n")
        self.stream.flush()


class _Reporter:
    """A thread-safe ``progress(done, total)`` callable that draws a bar. The bar appears at
    the first report of unfinished work: a call done in one step (one request) draws none."""

    def __init__(self, stream: TextIO, desc: str) -> None:
        self._stream = stream
        self._desc = desc
        self._lock = threading.Lock()
        self._closed = False
        self._tqdm = False
        self._bar: Any = None

    def _open(self) -> Any:
        try:
            from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]
        except ImportError:
            return _TextBar(self._stream, self._desc)
        self._tqdm = True
        return tqdm(total=None, desc=self._desc, file=self._stream, unit=" elements",
                    unit_scale=True, mininterval=_MIN_INTERVAL_S, leave=True,
                    dynamic_ncols=True, bar_format=_FORMAT_UNKNOWN)

    def __call__(self, done: int, total: Optional[int]) -> None:
        with self._lock:
            if self._closed:
                return
            if self._bar is None:
                if total is not None and done >= total:
                    return  # finished in one step: nothing to show
                self._bar = self._open()
            bar = self._bar
            if not self._tqdm:
                bar.update(done, total)
                return
            if total is not None and bar.total != total:
                bar.total = total
                bar.bar_format = _FORMAT
            if done != bar.n:
                bar.update(done - bar.n)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._bar is not None:
                    self._bar.close()


@contextlib.contextmanager
def progress_reporter(progress: ProgressArg, *, desc: str = "lossd", auto: bool = True
                      ) -> Iterator[Optional[Callable[[int, Optional[int]], None]]]:
    """The ``progress(done, total)`` callable a call should use (None: report nothing).

    ``progress`` is a call's ``progress=`` argument; ``auto`` says whether None means a bar on
    a terminal. A bar is drawn on ``sys.stderr`` as it is when the call starts, and closed
    when the ``with`` block ends.
    """
    if callable(progress) and not isinstance(progress, bool):
        yield progress
        return
    if progress is not None and not isinstance(progress, bool):
        raise ValueError(f"progress: expected None, True, False or a callable, got "
                         f"{progress!r}")
    stream = sys.stderr
    if stream is None or not wants_bar(progress, auto, stream):
        yield None
        return
    reporter = _Reporter(stream, desc)
    try:
        yield reporter
    finally:
        reporter.close()
