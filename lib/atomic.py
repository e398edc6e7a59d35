"""Writes that a crash cannot tear: write a temporary beside the target, flush it to disk, rename it into place.

Temporary names carry the writer's PID (`.<name>.<pid>.tmp`, `.tmp-<name>-<pid>`), so that what a killed
writer left behind can be told from what a live one is writing, and removed.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import psutil

logger = logging.getLogger(__name__)


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable (the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomic(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Let `write` fill a temporary beside `path`, flush it to disk and rename it over `path`: a crash leaves
    either the old file or the whole new one, never half of either."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    def write(handle: IO) -> None:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")

    replace_atomic(path, write)


def copy_atomic(source: str | Path, destination: str | Path) -> None:
    """Copy `source` to `destination` so that `destination` is either its old self or the whole new file."""
    with open(source, "rb") as src:
        replace_atomic(destination, lambda dst: shutil.copyfileobj(src, dst, 1 << 20), binary=True)


def writer_alive(pid: int) -> bool:
    """Whether process `pid` may still be writing (a killed one lingers as a zombie until it is reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def temporary_writer(path: Path) -> int | None:
    """The PID in a temporary's name (`.<name>.<pid>.tmp` file, `.tmp-<name>-<pid>` folder); None otherwise."""
    name = path.name
    if name.endswith(".tmp"):
        pid = name.removesuffix(".tmp").rsplit(".", 1)[-1]
    elif name.startswith(".tmp-"):
        pid = name.rsplit("-", 1)[-1]
    else:
        return None
    return int(pid) if pid.isdigit() else None


def remove_stale_temporaries(paths: Iterable[Path]) -> list[Path]:
    """Remove the temporaries among `paths` whose writer died (SIGKILL, power loss) before renaming them into
    place: they were never visible. A live writer's (a server beside its train subprocess) are left alone.
    Returns the removed paths."""
    removed = []
    for path in paths:
        pid = temporary_writer(path)
        if pid is None or writer_alive(pid):
            continue
        logger.info("removing %s, left by process %d, which is gone", path, pid)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def scratch_dir(prefix: str, suffix: str = "") -> Path:
    """A new folder in the system temp folder, removed when this process exits normally (a benchmark's copies of
    studies, model folders of 50 MB, client downloads, a server's results: nothing a later run should find)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
