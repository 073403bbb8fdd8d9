"""The state directory: found, created safely, and checked before the ledger trusts it.

The default directory is shared by every user of the machine (sticky and world-writable, like /tmp)
so that two users coordinate with no setup. An admin hardens it with ``chronos admin init-state-dir
DIR --group G`` (root:G, mode 3770, its files made by root: see :mod:`chronos.state_admin`) and points
``state_dir`` or ``CHRONOS_STATE_DIR`` at it.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import stat
import struct
from pathlib import Path

from chronos.config import Config
from chronos.errors import NotAllowedError, StateError

__all__ = ["check_dir", "file_mode_for", "group_name", "init_hint", "is_group_dir", "prepare_file", "state_dir",
           "write_trouble"]

_SHARED_DIR_MODE = 0o1777
_PRIVATE_DIR_MODE = 0o700


def state_dir(config: Config) -> Path:
    """The configured state directory, checked, and created when missing (shared unless named)."""
    return check_dir(Path(config.state_dir), shared=not config.state_dir_explicit)


def check_dir(path: Path, *, shared: bool) -> Path:
    """``path`` checked as a state directory; created when missing, shared (1777) or private (700)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        _create_dir(path, shared=shared)
        info = os.lstat(path)
    except OSError as exc:
        raise StateError(f"cannot read state directory {path}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise StateError(f"state directory {path} is a symlink; refusing it (remove it or set CHRONOS_STATE_DIR)")
    if not stat.S_ISDIR(info.st_mode):
        raise StateError(f"state directory {path} is not a directory")
    uid = os.getuid()
    if info.st_uid not in (uid, 0):
        writable_by_all = info.st_mode & stat.S_IWOTH
        sticky = info.st_mode & stat.S_ISVTX
        if writable_by_all and not sticky:
            raise StateError(
                f"state directory {path} is world-writable without the sticky bit; "
                "ask its owner to run: chmod +t " + str(path)
            )
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        why = write_trouble(path)
        if why is not None:
            raise StateError(f"cannot use state directory {path}: {why}")
        if is_group_dir(info.st_mode):
            name = group_name(info.st_gid)
            raise NotAllowedError(
                f"state directory {path} is for members of group {name}: ask an admin to add you "
                f"(sudo usermod -aG {name} {_user_name()}), then log in again or restart your server"
            )
        raise StateError(f"no permission to use state directory {path}; ask its owner to share it "
                         "(see docs/trust-model.md)")
    return path


#: ``FS_IOC_GETFLAGS`` and its ``FS_IMMUTABLE_FL`` / ``FS_APPEND_FL`` bits (``chattr +i`` / ``+a``).
_FS_IOC_GETFLAGS = 0x80086601
_FS_IMMUTABLE_FL = 0x10
_FS_APPEND_FL = 0x20


def write_trouble(path: Path) -> str | None:
    """Why ``path`` (or, when missing, its directory) cannot be written, in words; None when no
    cause is seen: a read-only file system, an immutable or append-only file, a full file system."""
    target = path if os.path.lexists(path) else path.parent
    try:
        fs = os.statvfs(target)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return f"{target} is on a read-only file system (remount it read-write, or set CHRONOS_STATE_DIR)"
    flags = _inode_flags(target)
    if flags & _FS_IMMUTABLE_FL:
        return f"{target} is immutable (chattr +i); an admin can run: chattr -i {target}"
    if flags & _FS_APPEND_FL:
        return f"{target} is append-only (chattr +a); an admin can run: chattr -a {target}"
    if fs.f_bavail == 0 or (os.geteuid() == 0 and fs.f_bfree == 0):
        return f"the file system holding {target} is full: free space there"
    return None


def _inode_flags(path: Path) -> int:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            buf = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("l", 0))
            return int(struct.unpack("l", buf)[0])
        finally:
            os.close(fd)
    return 0


def is_group_dir(mode: int) -> bool:
    """A directory shared through its group (the hardened setup), not through the world."""
    return mode & 0o070 == 0o070 and not mode & stat.S_IWOTH


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def init_hint(directory: Path) -> str:
    """The admin step that makes a group directory's files right (it never removes a file)."""
    try:
        gid = os.stat(directory).st_gid
    except OSError:
        return f"sudo chronos admin init-state-dir {directory} --group GROUP"
    return f"sudo chronos admin init-state-dir {directory} --group {group_name(gid)}"


def _create_dir(path: Path, *, shared: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    except OSError as exc:
        raise StateError(f"cannot create state directory {path}: {exc.strerror}") from None
    # chmod after mkdir: the umask must not narrow a shared directory.
    os.chmod(path, _SHARED_DIR_MODE if shared else _PRIVATE_DIR_MODE)


def file_mode_for(directory: Path) -> int:
    """Files get the read/write bits the directory grants: shared dir, shared files."""
    dir_mode = os.stat(directory).st_mode
    mode = 0o600
    if dir_mode & stat.S_IWGRP:
        mode |= 0o060
    if dir_mode & stat.S_IWOTH:
        mode |= 0o006
    return mode


def prepare_file(path: Path) -> Path:
    """Create ``path`` if missing, then refuse it if it is a symlink, not a file, or foreign-owned.

    Trusted owners: the caller, root, and the directory's owner (who could replace it anyway); in a
    directory shared through its group, also a member whose file belongs to the group and is group
    read/write (whoever came first made it; ``chronos doctor`` says when root should own it).
    """
    directory = path.parent
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        why = write_trouble(path)
        raise StateError(f"cannot create {path}: {why or exc.strerror}") from None
    else:
        try:
            os.fchmod(fd, file_mode_for(directory))
        finally:
            os.close(fd)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise StateError(f"{path} is a symlink; refusing it (remove it, or ask an admin to)")
    if not stat.S_ISREG(info.st_mode):
        raise StateError(f"{path} is not a regular file; refusing it")
    dir_info = os.stat(directory)
    trusted = {os.getuid(), 0, dir_info.st_uid}
    group_shared = is_group_dir(dir_info.st_mode) and info.st_gid == dir_info.st_gid
    if info.st_uid not in trusted and not (group_shared and info.st_mode & 0o060 == 0o060):
        advice = (f"ask an admin to run: {init_hint(directory)}" if is_group_dir(dir_info.st_mode)
                  else "ask an admin to check it (see docs/trust-model.md)")
        raise StateError(
            f"{path} is owned by uid {info.st_uid}, who neither owns the state directory nor is you; "
            f"refusing it ({advice})"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        why = write_trouble(path)
        if why is not None:
            raise StateError(f"cannot write {path}: {why}")
        if is_group_dir(dir_info.st_mode):
            raise StateError(f"no permission to write {path}; ask an admin to run: {init_hint(directory)}")
        raise StateError(
            f"no permission to write {path}; ask its owner to share the state directory "
            "(see docs/trust-model.md)"
        )
    return path
