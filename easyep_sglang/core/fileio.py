"""Writes that never leave a half-written file or directory behind: write beside the target, then rename."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise OSError(err.errno, f"no space left on the device holding {path.parent}; free space or write elsewhere") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


STAGING_MARK = ".easyep-tmp-"  # in the name of a staging directory: `.<out name>.easyep-tmp-<random>`


def staging_leftovers(out: Path) -> list[Path]:
    """Staging directories an interrupted run left beside `out`."""
    return sorted(out.parent.glob(f".{out.name}{STAGING_MARK}*"))


@contextmanager
def publish_directory(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory beside `out`. When the block ends, the directory is made readable by all
    (mkdtemp and some writers make private files; a server may run as another user) and renamed to `out`; an
    existing `out` is removed only after that. On any error the staging directory is removed and `out` is left
    as it was, so a reader never sees a half-written directory."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_MARK}", dir=out.parent))
    try:
        yield staging
        for folder, _, files in os.walk(staging):
            os.chmod(folder, os.stat(folder).st_mode | 0o555)
            for name in files:
                path = os.path.join(folder, name)
                os.chmod(path, os.stat(path).st_mode | 0o444)
        _replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_directory(staging: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.easyep-old-{os.getpid()}") if out.exists() else None
    if old:
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        if old:
            os.rename(old, out)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
    fd = os.open(out.parent, os.O_RDONLY)  # the rename itself reaches the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
