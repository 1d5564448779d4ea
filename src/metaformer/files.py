"""All-or-nothing file writes: the one writer of the package (weights, configs, checkpoints, CSV, plots).

Every write goes to a temporary file beside the target (``.NAME.pidPID.RANDOM.tmp``), is flushed and
fsynced, gets the permissions the umask gives any new file, and is renamed over the target with
``os.replace``; then the folder is fsynced. A crash, ``kill -9``, Ctrl-C or a full disk at any moment
leaves either the previous file or the new one, complete, never a mix. On any error the temporary file
is removed and the error says what happened (a full disk is named as such); a process killed with
SIGKILL cannot clean up after itself, so :func:`remove_stale_temporaries` removes the temporaries of
writers that are no longer running.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

__all__ = ["WriteError", "atomic_write", "prepare_write", "commit_write", "discard_write", "write_text",
           "write_bytes", "save_torch", "save_safetensors", "remove_stale_temporaries", "pending_temporaries",
           "folder_lock", "pid_alive"]

PathLike = Union[str, "os.PathLike[str]"]


class WriteError(OSError):
    """A file could not be written; the previous file (if any) is unchanged."""


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_path(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    # torch.save reports a failed write from its C++ zip writer as a RuntimeError without an errno.
    return isinstance(err, RuntimeError) and ("inline_container" in text or "file write failed" in text
                                              or "No space left" in text)


def prepare_write(path: PathLike, write: Callable[[str], Any]) -> str:
    """Runs ``write(tmp_path)`` to produce the complete file beside ``path``, without putting it in place.

    The first half of :func:`atomic_write`, for saves of several files that must change together:
    prepare each, then :func:`commit_write` them in an order whose every step is readable.

    Returns:
        The temporary path holding the complete, fsynced file.

    Raises:
        WriteError: if the file could not be written (disk full, no permission...); no temporary file
            is left behind.
        KeyboardInterrupt: re-raised after the same clean-up.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.pid{os.getpid()}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise WriteError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        write(tmp)
        _fsync_path(tmp)
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; give the file the usual permissions
    except BaseException as e:
        discard_write(tmp)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        if _is_disk_full(e):
            raise WriteError(errno.ENOSPC, f"cannot write {path}: the disk is full (No space left on device); "
                             f"the previous file is unchanged. Free some space and try again") from None
        if isinstance(e, OSError):
            raise WriteError(e.errno, f"cannot write {path}: {e.strerror or e}; the previous file is "
                             f"unchanged") from None
        raise
    return tmp


def commit_write(tmp: str, path: PathLike) -> None:
    """Puts a file made by :func:`prepare_write` in place of ``path`` (one atomic rename), then syncs the folder.

    Raises:
        WriteError: if the rename fails (a folder at ``path``, no permission...); ``tmp`` stays for the
            caller to :func:`discard_write`.
    """
    path = os.fspath(path)
    try:
        os.replace(tmp, path)
    except OSError as e:
        what = "a folder is in the way" if os.path.isdir(path) else (e.strerror or str(e))
        raise WriteError(e.errno, f"cannot write {path}: {what}; the previous file is unchanged") from None
    _fsync_path(os.path.dirname(os.path.abspath(path)), directory=True)


def discard_write(tmp: str) -> None:
    """Removes a file made by :func:`prepare_write` that will not be committed."""
    try:
        os.unlink(tmp)
    except OSError:
        pass


def atomic_write(path: PathLike, write: Callable[[str], Any]) -> None:
    """Runs ``write(tmp_path)`` to produce the file, then puts it in place of ``path`` atomically.

    Args:
        path: The file to write. Its folder must exist.
        write: Writes the whole file at the temporary path it is given.

    Raises:
        WriteError: if the file could not be written (disk full, no permission...); the previous
            file at ``path``, if any, is unchanged and no temporary file is left behind.
        KeyboardInterrupt: re-raised after the same clean-up.
    """
    tmp = prepare_write(path, write)
    try:
        commit_write(tmp, path)
    except BaseException:
        discard_write(tmp)
        raise


def write_text(path: PathLike, text: str) -> None:
    """Writes a UTF-8 text file atomically (see :func:`atomic_write`)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes a binary file atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def save_torch(obj: Any, path: PathLike) -> None:
    """``torch.save(obj)`` atomically (see :func:`atomic_write`)."""
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors(tensors: Dict[str, Any], path: PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
    """``safetensors.torch.save_file`` atomically (see :func:`atomic_write`)."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this machine (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


_TEMPORARY = re.compile(r"^\.(.+)\.pid(\d+)\.[A-Za-z0-9_]+\.tmp$")


def pending_temporaries(folder: PathLike, name: str) -> List[Tuple[str, int]]:
    """The temporary files of writes of ``name`` in ``folder``, as ``(path, writer PID)``, newest first."""
    folder = os.fspath(folder)
    found = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    for entry in entries:
        m = _TEMPORARY.match(entry)
        if m and m.group(1) == name:
            path = os.path.join(folder, entry)
            try:
                found.append((os.path.getmtime(path), path, int(m.group(2))))
            except OSError:
                continue
    return [(path, pid) for _, path, pid in sorted(found, reverse=True)]


def remove_stale_temporaries(folder: PathLike, names: Optional[List[str]] = None) -> List[str]:
    """Removes the temporary files that killed writers left in ``folder``.

    Only files named like :func:`atomic_write`'s temporaries whose writing process (by its PID) no
    longer runs on this machine are removed; a write in progress in another process is left alone.

    Args:
        folder: The folder to clean.
        names: Only the temporaries of these target names (default: of any file).

    Returns:
        The removed paths.
    """
    folder = os.fspath(folder)
    removed: List[str] = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        m = _TEMPORARY.match(entry)
        if not m or (names is not None and m.group(1) not in names) or pid_alive(int(m.group(2))):
            continue
        try:
            os.unlink(os.path.join(folder, entry))
            removed.append(os.path.join(folder, entry))
        except OSError:
            pass
    return removed


@contextlib.contextmanager
def folder_lock(folder: PathLike) -> Iterator[None]:
    """Holds an exclusive lock on ``folder`` (``flock`` on the folder itself) for the ``with`` block.

    Writers of one folder (two saves into one place) take turns instead of interleaving their files.
    Where the platform has no ``flock`` the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(os.fspath(folder), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
