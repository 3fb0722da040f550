"""The training corpus: the Python standard library source of the running interpreter.

Every machine that runs outrider has this corpus, so the recipe needs no download, and nothing
from it is ever written into the repository (only models trained on it are).
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HELDOUT_FRACTION = 0.02  # of files; enough held-out tokens for a stable loss, small cost to training


@dataclass(frozen=True)
class CorpusSplit:
    """Files of the corpus, split by file so that held-out text never leaks into training."""

    root: Path
    train: list[Path]
    heldout: list[Path]


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Path | None = None) -> list[Path]:
    """All ``*.py`` files under ``root``, minus site-packages, in a deterministic sorted order.

    site-packages holds third-party code that differs between machines; leaving it out keeps the
    corpus the same wherever the same Python version runs.
    """
    root = stdlib_root() if root is None else root
    if not root.is_dir():
        raise ValueError(f"corpus root {str(root)!r} is not a directory; pass the stdlib path")
    files = [
        path
        for path in root.rglob("*.py")
        if "site-packages" not in path.relative_to(root).parts and path.is_file()
    ]
    # Sort on the relative POSIX path so the order does not depend on the install prefix.
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(relative: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Stable, machine-independent choice of held-out files: a hash of the relative path."""
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_files(
    root: Path | None = None,
    *,
    fraction: float = HELDOUT_FRACTION,
    max_train: int | None = None,
    max_heldout: int | None = None,
    max_file_bytes: int | None = None,
) -> CorpusSplit:
    """Split the corpus by file; the caps keep the first files of each side (for toy runs)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction!r}")
    root = stdlib_root() if root is None else root
    train: list[Path] = []
    heldout: list[Path] = []
    for path in list_files(root):
        if max_file_bytes is not None and path.stat().st_size > max_file_bytes:
            continue
        side = heldout if is_heldout(path.relative_to(root).as_posix(), fraction) else train
        side.append(path)
    if max_train is not None:
        train = train[:max_train]
    if max_heldout is not None:
        heldout = heldout[:max_heldout]
    if not train or not heldout:
        raise ValueError(
            f"corpus under {str(root)!r} gave {len(train)} training and {len(heldout)} held-out "
            "files; both must be non-empty (is the stdlib source installed?)"
        )
    return CorpusSplit(root=root, train=train, heldout=heldout)


def read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8.

    A few stdlib test files are deliberately in other encodings; skipping them is simpler and
    more deterministic than guessing their codec.
    """
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def read_texts(files: Sequence[Path]) -> Iterator[str]:
    """Texts of the readable files, in the given order."""
    for path in files:
        text = read_text(path)
        if text is not None:
            yield text
