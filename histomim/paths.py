"""Paths built from data (a manifest's ``slide_id``, a checkpoint pointer) stay inside their folder.

A value read from a table or a file is a name, never a path: ``../x``, an absolute path or a separator
would let a crafted manifest write (or a hand-edited pointer read) anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path


def child_path(folder: str | Path, name: str, what: str) -> Path:
    """``folder / name`` for a single, ordinary file name; ``what`` names the value for the error.

    Raises:
        ValueError: ``name`` is empty, ``.``/``..``, absolute, or holds a path separator or NUL.
    """
    separators = {"/", "\\", os.sep, "\0"} | ({os.altsep} if os.altsep else set())
    if not name or name in (".", "..") or any(s in name for s in separators) or Path(name).is_absolute():
        raise ValueError(f"{what} {name!r} is not a plain file name: it would leave {folder}")
    return Path(folder) / name


__all__ = ["child_path"]
