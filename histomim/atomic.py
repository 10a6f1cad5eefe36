"""Atomic file writes: write a sibling, then move it into place with one ``os.replace``.

Readers, and reruns after a kill, see either the previous file or the complete new one, never a
truncated one; rerun logic that skips finished work ("the file exists") can trust what it finds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield ``<path>.partial`` to write to; on success it replaces `path`, on an error it is removed.

    The ``.partial`` suffix keeps leftovers of a killed process out of globs such as ``*.parquet``;
    writers that infer the format from the suffix need it passed explicitly (``savefig(..., format="png")``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if partial.is_file():
        give_normal_permissions(partial)
    os.replace(partial, path)


def give_normal_permissions(path: str | os.PathLike) -> None:
    """Mode 0666 less the umask, as ``open`` gives: tempfile-based writers (transformers' safetensors
    weights among them) leave 0600, which other users of a shared model folder cannot read."""
    os.chmod(path, 0o666 & ~UMASK)


def _read_umask() -> int:
    # reading the umask means setting it: done once, at import, before any worker thread exists
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()


__all__ = ["atomic_path", "give_normal_permissions"]
