"""Progress on a terminal, sane in a log: `seidra submit --wait` and the batch driver draw with it."""

from __future__ import annotations

from typing import TextIO

BAR_WIDTH = 24
# Erases what is left of the line after the cursor: a shorter text leaves no tail of the longer one.
CLEAR_TO_END = "\x1b[K"


def bar(done: int, total: int, unit: str = "") -> str:
    """`[#########---------------] 9/24 steps`."""
    filled = BAR_WIDTH * min(done, total) // total if total > 0 else 0
    return f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done}/{total}{' ' + unit if unit else ''}"


class StatusLine:
    """One line of progress on `stream`. On a terminal it is redrawn in place at every `show`; in a
    file or a pipe (a Ray job's log, CI) a line is written only when `state` changes, without
    carriage returns, so a log holds one line per state rather than hundreds of redraws."""

    def __init__(self, stream: TextIO, interactive: bool | None = None) -> None:
        self._stream = stream
        self._interactive = stream.isatty() if interactive is None else interactive
        self._state: str | None = None
        self._drawn = False

    def __enter__(self) -> StatusLine:
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.close()

    def show(self, state: str, text: str) -> None:
        if self._interactive:
            self._stream.write(f"\r{text}{CLEAR_TO_END}")
            self._drawn = True
        elif state != self._state:
            self._stream.write(f"{text}\n")
        self._state = state
        self._stream.flush()

    def close(self) -> None:
        """Ends a redrawn line, so that what follows starts on a line of its own."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False
