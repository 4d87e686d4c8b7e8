"""The progress bar of long calls (lossd._progress): tqdm when installed, a built-in renderer
otherwise; on when forced or when stderr is a terminal, silent otherwise."""

from __future__ import annotations

import builtins
import io
import sys
import threading

import pytest

from lossd import _progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(params=["tqdm", "builtin"])
def renderer(request, monkeypatch):
    """Both renderers: tqdm (a test requirement) and the built-in one (tqdm's import made to
    fail, as where it is not installed)."""
    if request.param == "tqdm":
        pytest.importorskip("tqdm", reason="tqdm is not installed (tests/requirements.txt)")
    else:
        real_import = builtins.__import__

        def no_tqdm(name, *args, **kwargs):
            if name == "tqdm" or name.startswith("tqdm."):
                raise ImportError("No module named 'tqdm' (simulated)")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_tqdm)
        monkeypatch.delitem(sys.modules, "tqdm", raising=False)
    return request.param


def drive(report, total=1000) -> None:
    for done in range(0, total + 1, 250):
        report(done, total)


@pytest.mark.parametrize("progress", [None, True])
def test_bar_on_a_terminal_or_forced(renderer, monkeypatch, progress) -> None:
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    with _progress.progress_reporter(progress, desc="lossd") as report:
        assert report is not None
        drive(report)
    text = err.getvalue()
    assert "lossd: " in text and "elements (100.0%)" in text
    assert text.endswith("\n")  # the bar is closed: the next output starts on a new line


def test_forced_bar_on_a_pipe_and_unknown_total(renderer, monkeypatch) -> None:
    err = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", err)
    with _progress.progress_reporter(True) as report:
        report(5000, None)
        report(12000, None)
    text = err.getvalue()
    assert "lossd: " in text and "elements" in text and "12" in text and "%" not in text


@pytest.mark.parametrize("progress", [None, False])
def test_silent_on_a_pipe_or_when_off(renderer, monkeypatch, progress) -> None:
    for stream in (io.StringIO(), FakeTTY()):
        if progress is None and stream.isatty():
            continue  # auto on a terminal draws (above)
        monkeypatch.setattr(sys, "stderr", stream)
        with _progress.progress_reporter(progress) as report:
            assert report is None
        assert stream.getvalue() == ""


def test_off_on_a_terminal_is_silent(monkeypatch) -> None:
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    with _progress.progress_reporter(False) as report:
        assert report is None
    with _progress.progress_reporter(None, auto=False) as report:  # evaluations: no auto bar
        assert report is None
    assert err.getvalue() == ""


def test_callable_is_used_as_is_and_bad_values_raise(monkeypatch) -> None:
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    seen = []

    def callback(done, total):
        seen.append((done, total))

    with _progress.progress_reporter(callback) as report:
        assert report is callback
        report(3, 4)
    assert seen == [(3, 4)] and err.getvalue() == ""
    with pytest.raises(ValueError, match="progress"):
        with _progress.progress_reporter("yes"):  # type: ignore[arg-type]
            pass


def test_bar_is_thread_safe_and_ignores_reports_after_close(renderer, monkeypatch) -> None:
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    with _progress.progress_reporter(True) as report:
        threads = [threading.Thread(target=drive, args=(report, 4000)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    size = len(err.getvalue())
    report(10, 20)  # a late report from a thread that outlived the call
    assert len(err.getvalue()) == size and "elements (100.0%)" in err.getvalue()


def test_a_call_done_in_one_step_draws_nothing(renderer, monkeypatch) -> None:
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    with _progress.progress_reporter(True) as report:
        report(1000, 1000)  # one request: its only report is "all done"
    assert err.getvalue() == ""
