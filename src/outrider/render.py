"""Showing where committed tokens came from: drafted-and-accepted vs produced by the target."""

from __future__ import annotations

from typing import TextIO

from outrider.decoder import Chunk

GREEN, RESET = "\033[32m", "\033[0m"


def render_chunk(chunk: Chunk, colour: bool) -> str:
    """Text of a chunk with drafted tokens marked: green in a terminal, else wrapped in [ ]."""
    out = []
    for piece, drafted in zip(chunk.pieces, chunk.drafted):
        if not drafted or not piece:
            out.append(piece)
        elif colour:
            out.append(f"{GREEN}{piece}{RESET}")
        else:
            out.append(f"[{piece}]")
    return "".join(out)


def legend(colour: bool) -> str:
    drafted = f"{GREEN}green{RESET}" if colour else "[bracketed]"
    return f"({drafted}: proposed by the drafter and accepted by the target; plain: produced by the target)"


def wants_colour(stream: TextIO) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()
