"""Putting a finished export in place, one exporter per OUT at a time. Torch-free.

An export holds an exclusive lock (flock) on `.<OUT name>.lock` beside OUT from before
it looks at OUT until the new folder is in place, so a second export into the same
OUT is refused at once instead of racing it. It builds the artifact in a staging
folder beside OUT, `.<OUT name>.partial-<pid>`, and publishes it with a rename that
never replaces anything it did not expect:

- OUT absent when the export started: the staging folder is renamed to OUT only if
  OUT is still absent (renameat2 RENAME_NOREPLACE); a folder that appeared there
  meanwhile is left as it is, and the export fails.
- OUT present and --overwrite: only a diffrt artifact folder (or an empty folder) is
  replaced, and only if it is still the same folder (device and inode) at the end.

A staging folder whose exporter is gone (killed) is removed by the next export into
the same parent folder: no live exporter holds its lock. The holder deletes the lock
file before it lets go, and a process that took a lock checks that the file it
locked is still the one at that path (else it locks again): so two processes never
both hold OUT's lock through different files.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from diffrt.artifacts import MANIFEST_NAME
from diffrt.errors import DiffrtError

logger = logging.getLogger(__name__)

PARTIAL = ".partial-"
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1

Identity = tuple[int, int]  # (st_dev, st_ino): which folder, whatever its name


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}{PARTIAL}{os.getpid()}"


@contextmanager
def export_lock(out: Path) -> Iterator[None]:
    """Hold OUT's export lock, or refuse in one line when another exporter holds it."""
    path = lock_path(out)
    fd = _acquire(path, out)
    try:
        with suppress(OSError):  # a lock file this account may only read: no pid shown
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)  # for the refusal's message only
        yield
    finally:
        _release(fd, path)


def _acquire(path: Path, out: Path) -> int:
    for _ in range(100):
        fd = _open_lock(path, create=True)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (process {holder})" if holder.isdigit() else ""
            raise DiffrtError(f"another export into {out} is running{who}; wait for it to finish, or choose "
                              "another OUT") from None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its holder deleted it as we opened it: lock the file there now
    raise DiffrtError(f"cannot take the export lock {path}: it keeps being replaced")


def _release(fd: int, path: Path) -> None:
    with suppress(OSError):  # not ours to delete (another account's folder): it stays, harmless
        if _same_file(fd, path):
            os.unlink(path)
    os.close(fd)  # releases the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _open_lock(path: Path, create: bool) -> int:
    """The lock file, opened for flock (which needs no write access: another account's
    lock file is opened read-only)."""
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        try:
            return os.open(path, flags | os.O_RDWR | (os.O_CREAT if create else 0), 0o666)  # mode: the umask's
        except PermissionError:
            return os.open(path, flags | os.O_RDONLY)
    except OSError as exc:
        if not create:
            raise
        raise DiffrtError(f"cannot create the export lock {path} ({exc.strerror or exc}); choose an OUT in a "
                          "writable folder") from None


def replaceable(out: Path, overwrite: bool) -> Identity | None:
    """Under the lock: the identity of the folder at OUT that publishing may replace,
    or None when OUT is absent. Refuses (one line) an existing OUT without
    `overwrite`, and with it anything but a diffrt artifact folder or an empty folder."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return None
    if not overwrite:
        raise DiffrtError(f"{out} already exists; choose another OUT or pass --overwrite")
    is_folder = stat.S_ISDIR(st.st_mode)
    if not is_folder or not ((out / MANIFEST_NAME).is_file() or not any(out.iterdir())):
        raise DiffrtError(f"{out} is not a diffrt artifact folder (no {MANIFEST_NAME}) nor an empty folder; "
                          "--overwrite replaces only those: remove it yourself or choose another OUT")
    return (st.st_dev, st.st_ino)


def sweep_partials(out: Path) -> None:
    """Remove staging folders in OUT's parent whose exporter is gone (call holding OUT's
    lock): OUT's own (no one else can hold its lock now) and other OUTs' whose lock
    this process can take (their exporter died)."""
    for path in sorted(out.parent.glob(f".*{PARTIAL}*")):
        name, _, pid = path.name[1:].rpartition(PARTIAL)
        if not name or not pid.isdigit() or path.is_symlink() or not path.is_dir():
            continue
        if name == out.name:  # this process holds its lock
            _remove_partial(path)
            continue
        other = out.parent / name
        try:
            fd = _open_lock(lock_path(other), create=False)
        except FileNotFoundError:  # no exporter holds a lock for it (or one older than locks)
            if not _pid_alive(int(pid)):
                _remove_partial(path)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # its exporter is running
            continue
        if _same_file(fd, lock_path(other)):
            _remove_partial(path)
        _release(fd, lock_path(other))


def _remove_partial(path: Path) -> None:
    logger.info("removing %s, left by an export that did not finish", path)
    shutil.rmtree(path, ignore_errors=True)


def publish(staging: Path, out: Path, replaces: Identity | None) -> None:
    """Move the finished folder to OUT (see the module docstring). A folder at OUT that
    this export was not told to replace is never touched."""
    if replaces is None:
        try:
            _rename_noreplace(staging, out)
        except FileExistsError:
            raise DiffrtError(f"{out} appeared while exporting (made by something else); it was left as it is and "
                              "nothing was written: remove it or choose another OUT, and export again") from None
        return
    if _identity(out) != replaces:
        raise DiffrtError(f"{out} was replaced or removed while exporting; it was left as it is and nothing was "
                          "written: export again")
    backup = out.parent / f".{out.name}.old-{os.getpid()}"
    _rename_noreplace(out, backup)
    if _identity(backup) != replaces:  # swapped in the instant between the check and the rename
        _rename_noreplace(backup, out)
        raise DiffrtError(f"{out} was replaced while exporting; it was left as it is: export again")
    try:
        _rename_noreplace(staging, out)
    except BaseException:
        _rename_noreplace(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another account's
        return True
    return True


def _identity(path: Path) -> Identity | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with FileExistsError when `dst` exists (an empty folder
    included, which plain rename would silently replace). Linux renameat2; elsewhere,
    or on a file system without it, a check just before the rename."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is not None:
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))  # EEXIST/ENOTEMPTY: FileExistsError
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


__all__ = ["export_lock", "lock_path", "publish", "replaceable", "staging_path", "sweep_partials"]
