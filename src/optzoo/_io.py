"""Checkpoint files and blobs: written atomically, verified by a SHA-256 on load, read without executing code.

A checkpoint is ``MAGIC + sha256(payload) + payload`` where ``payload`` is ``torch.save`` of plain tensors
and containers. torch's zip reader checks no CRCs (a flipped byte in a tensor or in the pickled
metadata loads as a different value), so the digest covers every byte of the payload: any damage is a
ValueError naming the file. Files written before the digest (a bare ``torch.save`` zip, the same payload)
still load, with a warning that they cannot be verified.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import tempfile
import warnings

import torch

__all__ = ["atomic_save", "safe_load", "dumps", "loads"]

#: The envelope's first bytes (PNG-style: a non-ASCII byte, a name, CR LF, EOF): no single flipped byte turns
#: it into the ``PK\x03\x04`` of a bare zip, so a damaged new file is never read as an unverified old one.
MAGIC = b"\x89optzoo-sha256\r\n\x1a\n"
_DIGEST = hashlib.sha256().digest_size
_ZIP = b"PK\x03\x04"  # torch.save's zip: the files written before the digest


def dumps(obj) -> bytes:
    """``torch.save`` of ``obj`` (plain tensors and containers), in the digest envelope."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def loads(data: bytes, fmt: str, where: str, expected: str):
    """The object ``dumps`` wrote, verified and read with ``torch.load(weights_only=True)``; its ``format``
    entry must be ``fmt``. Errors are ValueErrors starting with ``where`` (e.g. "trainer states file '...'");
    ``expected`` says what should have been given (e.g. "an optzoo trainer states file")."""
    data = bytes(data)
    if data.startswith(MAGIC):
        if len(data) < len(MAGIC) + _DIGEST:
            raise ValueError(f"{where} could not be read: truncated ({len(data)} bytes, shorter than its header)")
        digest, payload = data[len(MAGIC):len(MAGIC) + _DIGEST], data[len(MAGIC) + _DIGEST:]
        if hashlib.sha256(payload).digest() != digest:
            raise ValueError(f"{where} could not be read: its SHA-256 does not match its contents "
                             "(truncated or corrupted)")
    elif data.startswith(_ZIP):
        payload = data
    else:
        raise ValueError(f"{where} could not be read (no optzoo checkpoint header): truncated, corrupted or not "
                         f"written by optzoo; expected {expected}")
    try:
        blob = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - anything the restricted unpickler or the zip reader raises
        raise ValueError(f"{where} could not be read ({type(exc).__name__}: {_cause(exc)}): truncated, corrupted "
                         f"or not written by optzoo; expected {expected}") from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise ValueError(f"{where} is not {expected}: expected format {fmt!r}")
    if payload is data:
        warnings.warn(f"{where} was written before optzoo checkpoints carried a SHA-256: it cannot be verified; "
                      "save it again to add one", UserWarning, stacklevel=3)
    return blob


def _cause(exc) -> str:
    """One line of ``exc``'s message: torch's refusals run to a page; their line that says what was refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = next((x for x in lines if x.startswith("WeightsUnpickler error")), lines[0] if lines else "")
    return line if len(line) <= 300 else line[:297] + "..."


def _write_bytes(f, data: bytes) -> None:
    """Write ``data`` to the open file ``f`` (a seam: tests make it fail as a full disk does)."""
    f.write(data)


def _stale(folder: str, base: str):
    """The temporary files of earlier interrupted saves to ``base`` (``mkstemp``'s ``<base>.XXXXXXXX.tmp``)."""
    pattern = re.compile(re.escape(base) + r"\.[a-z0-9_]{8}\.tmp\Z")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [os.path.join(folder, n) for n in names if pattern.match(n)]


def _os_error(exc: OSError, path: str, what: str, doing: str) -> OSError:
    """``exc`` (an OSError) retold with the path and what was being done; the same errno, so the same subclass
    (PermissionError, IsADirectoryError, ...)."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    err = OSError(exc.errno, f"{what} file could not be {doing} ({cause})") if exc.errno else \
        OSError(f"{what} file {path!r} could not be {doing} ({cause})")
    err.filename = path if exc.errno else None
    return err


def atomic_save(obj, path, what: str = "checkpoint") -> None:
    """Write ``dumps(obj)`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    A crash mid-write leaves the old file (or none) under the name, never half a file; the temporary files
    such a crash leaves are removed by the next successful save to ``path``. A failure (full disk, read-only
    folder, ``path`` a directory) raises an OSError naming ``path`` and the cause, and leaves no file behind.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"{what} file could not be written: it is a directory", path)
    data = dumps(obj)  # serialised first: a failure of torch.save never leaves a temporary file
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=base + ".", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _os_error(exc, path, what, "written") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            _write_bytes(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _os_error(exc, path, what, "written") from exc
        raise
    for old in _stale(folder, base):  # an interrupted save's leftovers (SIGKILL skips the cleanup above)
        try:
            os.unlink(old)
        except OSError:
            pass
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def safe_load(path, fmt: str, what: str):
    """Read a file ``atomic_save`` wrote: digest verified, ``torch.load(weights_only=True)`` (plain tensors and
    containers only), format checked.

    Any unreadable, truncated, corrupted or foreign file raises ValueError naming the path; a missing path
    FileNotFoundError, a directory IsADirectoryError, an unreadable one the OSError naming it.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"{what} file could not be read: it is a directory", path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, f"{what} file does not exist", path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise _os_error(exc, path, what, "read") from exc
    return loads(data, fmt, f"{what} file {path!r}", f"an optzoo {what} file")
