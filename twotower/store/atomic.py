"""Atomic writes: a file or folder is built in a staging name beside its target and renamed
into place only once complete, so a reader never sees half an artifact and a killed writer
leaves the previous one in place. Staging names carry the writer's process id: a later run
removes those of dead writers. Also the inter-process lock that serialises read-modify-writes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_MARK = ".tmp-"  # staging names: .<target name>.tmp-<pid>-<random>[suffix]


def _staging_prefix(target: Path) -> str:
    return f".{target.name}{STAGING_MARK}"


def _staging_path(target: Path) -> Path:
    """A new name beside ``target`` carrying this process's id, so a later run can tell
    whether its writer is still alive. (Not tempfile's: its 0700/0600 modes would outlive
    the rename; ``os.mkdir``/``os.open`` keep the umask's.)"""
    return target.with_name(f"{_staging_prefix(target)}{os.getpid()}-{secrets.token_hex(4)}{target.suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _remove_stale_staging(target: Path) -> None:
    """Remove staging files and folders for ``target`` left by processes that died (a killed stage);
    those of a live process are its work in progress."""
    pattern = re.compile(re.escape(_staging_prefix(target)) + r"(\d+)-")
    for candidate in target.parent.glob(_staging_prefix(target) + "*"):
        match = pattern.match(candidate.name)
        if match and not _pid_alive(int(match.group(1))):
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                candidate.unlink(missing_ok=True)


_RENAME_EXCHANGE = 2  # from <linux/fs.h>


_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a))


def _swap_in(staging: Path, target: Path) -> None:
    """Put the complete ``staging`` folder at ``target``; the old folder ends up at ``staging`` or is removed."""
    if not target.exists():
        os.rename(staging, target)
        return
    try:
        _exchange(staging, target)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise
        # A filesystem that cannot exchange: move the old folder aside, then the new one in.
        # For that instant ``target`` is missing; a kill right there makes the export ask for a re-run.
        aside = _staging_path(target)
        os.rename(target, aside)
        os.rename(staging, target)
        shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A new folder beside ``target`` (named as ``atomic_dir`` names its staging folders), removed
    on exit whatever happened; one left by a killed process is removed the next time one is made."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    staging = _staging_path(target)
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A staging folder beside ``target`` to build the new folder in; on success it replaces
    ``target`` whole, so at every instant ``target`` is the old complete folder or the new one.

    On an exception the staging folder is removed and ``target`` is untouched; one left by a
    killed process is removed the next time a stage writes ``target``. After the swap the old
    folder is in the staging folder's place and is removed with it.
    """
    with staging_dir(target) as staging:
        yield staging
        _swap_in(staging, target)


@contextmanager
def atomic_file(target: Path, durable: bool = False) -> Iterator[Path]:
    """A staging path beside ``target`` (same suffix) to write the new file to; on success it
    replaces ``target`` in one rename. ``durable`` also fsyncs the file and its folder."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    staging = _staging_path(target)
    os.close(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield staging
        if durable:
            _fsync(staging)
        os.replace(staging, target)
        if durable:
            _fsync(target.parent)
    finally:
        staging.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Held by one process at a time (an advisory lock on ``path``, released if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
