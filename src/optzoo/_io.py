"""Checkpoint files: written atomically, read without executing code."""
from __future__ import annotations

import os
import tempfile

import torch

__all__ = ["atomic_save", "safe_load"]


def atomic_save(obj, path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    A crash mid-write leaves the old file (or none) under the name, never half a file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def safe_load(path, fmt: str, what: str):
    """``torch.load(weights_only=True)`` (plain tensors and containers only) and a format check.

    Any unreadable, truncated or foreign file raises ValueError naming the path.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ValueError(f"{what} file {path!r} could not be read ({type(exc).__name__}: {exc}): truncated, "
                         f"corrupted or not written by optzoo") from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise ValueError(f"{what} file {path!r} is not an optzoo {what} file: expected format {fmt!r}")
    return blob
