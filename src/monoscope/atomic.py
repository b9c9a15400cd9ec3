"""The one way outputs are written: whole or not at all, durable once renamed, no temporaries left.

Every output (a file or a directory) is built under a hidden temporary sibling,
`.<name>.tmp-<host>-<pid>`, fsynced, and renamed onto its final name; the parent directory is
fsynced so the rename survives a crash of the node. An existing output is replaced only after the
new one is whole: a file by one atomic rename; a directory (which rename cannot overwrite) is first
moved aside to `.<name>.old-<host>-<pid>`, then the new one renamed in, then the old one removed.
A kill between those two renames leaves no output, never a half one, so the rerun rebuilds it.

Stale temporaries: Snakemake runs at most one job per output at a time, so when a job starts
writing an output, any `.<name>.tmp-*` or `.<name>.old-*` sibling is left from an earlier attempt
that died (kill -9, a lost node) and is removed then, however large.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

_TAG = f"{socket.gethostname()}-{os.getpid()}"


def temporary_sibling(final: Path, kind: str = "tmp") -> Path:
    return final.with_name(f".{final.name}.{kind}-{_TAG}")


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Remove every temporary or set-aside sibling of `final` left by an earlier attempt; return them."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    stale = [p for kind in ("tmp", "old") for p in final.parent.glob(f".{_glob_escape(final.name)}.{kind}-*")]
    for path in stale:
        _remove(path)
    return stale


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to build the output in (a file or a directory); rename it
    onto `path` only if the block succeeds, durably. On failure nothing of it is left."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = temporary_sibling(final)
    try:
        yield tmp
        if not tmp.exists() and not tmp.is_symlink():
            raise FileNotFoundError(f"nothing was written to {tmp} for {final}")
        _fsync_tree(tmp)
        _replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """open() for writing, through atomic_path: readers see the old file or the whole new one."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as file:
        yield file


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", newline="") as file:
        file.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as file:
        file.write(data)


def savefig(fig, path: str | os.PathLike, **kwargs: Any) -> None:
    """matplotlib's savefig, whole or not at all; the format follows the final name's suffix."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or None)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **kwargs)


def _replace(tmp: Path, final: Path) -> None:
    if (final.is_dir() and not final.is_symlink()) or (tmp.is_dir() and (final.exists() or final.is_symlink())):
        old = temporary_sibling(final, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        _remove(old)
    else:
        os.replace(tmp, final)  # a file onto a file: one atomic step
        _fsync_dir(final.parent)


def _fsync_tree(path: Path) -> None:
    """fsync every file and directory under path (a rename is only as durable as what it names)."""
    if path.is_symlink():
        return
    if path.is_file():
        _fsync_file(path)
        return
    walked = list(os.walk(path))
    files = [Path(root) / name for root, _, names in walked for name in names]
    # Many at once: on a network file system each fsync is a round trip; locally the disk queues them.
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
        list(pool.map(_fsync_file, files))
    for root, _, _ in reversed(walked):  # directories after their files, deepest first
        _fsync_dir(Path(root))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse to open or fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
