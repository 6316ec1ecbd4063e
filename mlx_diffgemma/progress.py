"""A one-line progress display on a terminal while a canvas denoises: the canvas, the step and the
start of the live draft, dimmed, on the line below the cursor, so that the reply printed so far
(which may end mid-line) is left as it is."""

from __future__ import annotations

import os
import re
import unicodedata
from typing import TextIO

from .repl import printable

# ESC D / ESC M (index, reverse index) move down / up one line in the same column, scrolling
# at the bottom; ESC 7 / ESC 8 save and restore the cursor. Going down and back up first
# makes room below the cursor, so that saving it survives drawing there.
MAKE_ROOM, SAVE, RESTORE, DOWN = "\x1bD\x1bM", "\x1b7", "\x1b8", "\x1bD"
ERASE_LINE, DIM, RESET = "\r\x1b[2K", "\x1b[2m", "\x1b[0m"


def display_width(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal columns, with an ellipsis where it was cut."""
    used, out = 0, []
    for char in text:
        used += display_width(char)
        if used > width - 1:
            return "".join(out) + "…"
        out.append(char)
    return text


class Progress:
    """``show`` draws ``canvas N, step S/M  draft...`` below the cursor; ``clear`` erases it and
    must come before anything else is printed to the terminal."""

    def __init__(self, stream: TextIO, steps: int):
        self.stream, self.steps, self.canvas, self.shown = stream, steps, 0, False

    def show(self, step: int, draft: str) -> None:
        """The draft of ``step`` (a step 1 starts the next canvas)."""
        self.canvas += step == 1
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns or 80
        except (OSError, ValueError):
            width = 80
        draft = " ".join(printable(draft).split())
        line = fit(f"canvas {self.canvas}, step {step}/{self.steps}  {draft}".rstrip(), width)
        if not self.shown:
            self.stream.write(MAKE_ROOM)
        self.stream.write(f"{SAVE}{DOWN}{ERASE_LINE}{DIM}{line}{RESET}{RESTORE}")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write(f"{SAVE}{DOWN}{ERASE_LINE}{RESTORE}")
            self.stream.flush()
            self.shown = False
