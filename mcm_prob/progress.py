"""Progress display that suits where the output goes: a bar on a terminal, a widget in Jupyter
(a text bar there when ipywidgets is missing, never tqdm's "IProgress not found" warning), and
plain dated lines in a log file or a pipe (no carriage returns or escape codes).

`progress_bar(total, desc)` returns a tqdm-like object (context manager; `update(n)`,
`set_postfix_str(stage)`, `set_postfix(**running_values)`, `total` that may grow);
`status(message)` writes one line. Both write to standard error and do nothing when `enabled`
is False.
"""

from __future__ import annotations

import sys
import threading
import time

from tqdm import std

__all__ = ["progress_bar", "status"]

LINE_INTERVAL_S = 10.0  # plain lines: at most one per this many seconds (plus start and end)


def _in_notebook() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


def _widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Lines:
    """A tqdm stand-in for output that is not a terminal: ``desc: n/total (elapsed s) postfix``
    lines at the start, at each new stage, at most every `LINE_INTERVAL_S` seconds otherwise,
    and at the end (unless the last line said it). Thread-safe."""

    def __init__(self, total, desc: str, initial: int = 0):
        self.total, self.desc, self.n = total, desc, initial
        self.postfix, self._lock = "", threading.Lock()
        self._start = self._last = time.monotonic()
        self._write()

    def _write(self) -> None:
        total = "" if self.total is None else f"/{self.total}"
        post = f" {self.postfix}" if self.postfix else ""
        elapsed = time.monotonic() - self._start
        print(f"{self.desc}: {self.n}{total} ({elapsed:.0f} s){post}", file=sys.stderr, flush=True)
        self._last, self._shown = time.monotonic(), (self.n, self.total, self.postfix)

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.n += n
            if time.monotonic() - self._last >= LINE_INTERVAL_S:
                self._write()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """A new stage (e.g. ``compiling``): written at once when it changes."""
        with self._lock:
            changed, self.postfix = s != self.postfix, s
            if changed and refresh:
                self._write()

    def set_postfix(self, **kwargs) -> None:
        """Running values (e.g. the loss): shown with the next line."""
        with self._lock:
            self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        """A last line, unless the last one already said it all."""
        with self._lock:
            if self._shown != (self.n, self.total, self.postfix):
                self._write()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(
    total: int | None, desc: str, *, enabled: bool = True, initial: int = 0, leave: bool = True
):
    """A progress bar of `total` steps named `desc` on standard error (module docstring)."""
    if not enabled:
        return std.tqdm(total=total, disable=True)
    if _in_notebook():
        if _widgets():
            from tqdm import notebook

            return notebook.tqdm(total=total, desc=desc, initial=initial, leave=leave)
        return std.tqdm(total=total, desc=desc, initial=initial, leave=leave, file=sys.stderr)
    if _terminal():
        return std.tqdm(total=total, desc=desc, initial=initial, leave=leave)
    return _Lines(total, desc, initial)


def status(message: str, *, enabled: bool = True) -> None:
    """One line on standard error (above any running terminal bar)."""
    if enabled:
        std.tqdm.write(message, file=sys.stderr)
