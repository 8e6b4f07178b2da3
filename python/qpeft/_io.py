"""Atomic writes of the files a user keeps (adapters, checkpoints, benchmark results).

    with atomic_paths(out / "adapter_model.safetensors", out / "adapter_config.json") as (weights, config):
        save_file(tensors, weights)           # each writer gets a temporary path in the target's directory
        Path(config).write_text(text)
    # only here, after every writer has succeeded, do the targets get replaced (os.replace, in the given order)

A failure inside the block (serialization, a full disk, an interrupt) removes the temporary files and leaves
every target as it was, byte for byte. A temporary file is created with open()'s permissions (0o666 minus the
umask, not mkstemp's 0o600) and fsync'ed before it replaces its target, so a crash never leaves a renamed but
empty file. Several targets are replaced one `os.replace` after the other: a process killed between two of
them (a few microseconds) leaves the earlier targets new and the later ones old; callers order the targets so
that state is detectable (see adapter_io). The directory itself is not fsync'ed: after a power loss the
rename may be lost, leaving the previous file, never a partial one.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_paths", "atomic_write_text", "atomic_write_bytes"]


def _temp_path(target: Path) -> Path:
    """A new empty file next to `target` (same directory: os.replace never crosses a file system)."""
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {target}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_paths(*targets: str | os.PathLike, fsync: bool = True) -> Iterator[list[str]]:
    """Temporary paths (str) for `targets`, in their directories; on success each replaces its target, in the
    order given; on any exception the temporary files are removed and the targets are untouched."""
    if not targets:
        raise ValueError("atomic_paths: at least one target path is required")
    paths = [Path(t) for t in targets]
    if len(set(map(os.path.abspath, paths))) != len(paths):
        raise ValueError(f"atomic_paths: the targets must be distinct, got {[str(p) for p in paths]}")
    temps: list[Path] = []
    try:
        for p in paths:
            temps.append(_temp_path(p))
        yield [str(t) for t in temps]
        if fsync:
            for t in temps:
                _fsync(t)
    except BaseException:
        _remove(temps)
        raise
    for i, (t, p) in enumerate(zip(temps, paths)):
        try:
            os.replace(t, p)
        except BaseException:  # e.g. the target is a directory: the later targets stay old, no temp remains
            _remove(temps[i:])
            raise


def _remove(temps: list[Path]) -> None:
    for t in temps:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(t)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_paths(path, fsync=fsync) as (tmp,):
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", fsync: bool = True) -> None:
    """Path.write_text, atomically (the text is encoded before any file is touched)."""
    atomic_write_bytes(path, text.encode(encoding), fsync=fsync)
