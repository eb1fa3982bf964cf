"""Whole-or-nothing file writes and checksums: a crash, Ctrl-C or full disk never leaves a partial file.

One mechanism serves every writer: `staged` makes a temporary file (or folder) beside the final place
and removes it on any error; `publish` syncs it and renames it into place (atomic on one filesystem).
`atomic_path` is the two together for a file whose final name is known up front; the build names
engine files by their checksum and the ONNX export publishes a folder's worth of files, so they use
the two steps themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

PARTIAL_SUFFIX = ".partial"  # temporary files of a writer still at work (or killed: `_exclusive_build` sweeps them)


def sha256_file(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def staged(folder: str | os.PathLike, prefix: str, *, directory: bool = False):
    """Yield a new temporary file (or folder) in `folder`, named `.{prefix}.*`; it is removed when the
    block raises, and whatever is still there when the block ends (what was not published) goes too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}.", dir=folder))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{prefix}.", suffix=PARTIAL_SUFFIX, dir=folder)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Flush `tmp` to disk, then rename it to `final` (replacing any file there)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return Path(final)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary path beside `final`; on success it replaces `final`, on any error it vanishes."""
    final = Path(final)
    with staged(final.parent, final.name) as tmp:
        yield tmp
        publish(tmp, final)


def atomic_write_bytes(final: str | os.PathLike, data) -> int:
    """Write `data` (bytes or any buffer, e.g. TensorRT's IHostMemory) whole or not at all; returns its size."""
    view = memoryview(data).cast("B")
    with atomic_path(final) as tmp:
        tmp.write_bytes(view)
    return view.nbytes


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and prove we can write there, with an error that says what to do."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(
            f"cannot write engines to {str(path)!r} ({exc.strerror or exc}); pass a writable --engine-dir / engine_dir"
        ) from exc
    return path
