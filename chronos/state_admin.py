"""The hardened state directory: made once by an admin, then usable by every member of a group.

``init_state_dir("/var/lib/chronos", "gpu-users")`` (``sudo chronos admin init-state-dir``) makes the
directory ``root:gpu-users`` mode ``3770`` and every file Chronos keeps in it ``root:gpu-users 0660``
before anyone uses it: so whoever comes first, every member and root can read and write them, and
(sticky bit, root-owned files) no member can remove, rename or replace a file for the others.
``audit_state_dir`` says what keeps a directory from working for the users it is meant for.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass, field
from pathlib import Path

from chronos import waiting
from chronos.devices.simulated import LOCK_FILE, STATE_FILE
from chronos.engine import Engine
from chronos.errors import InvalidRequestError, NotAllowedError, StateError
from chronos.state import group_name, init_hint, is_group_dir

__all__ = ["DIR_MODE", "FILE_MODE", "InitResult", "audit_state_dir", "init_state_dir", "state_files"]

#: setgid (new files join the group), sticky (only a file's owner or root may remove or rename it).
DIR_MODE = 0o3770
FILE_MODE = 0o660
_LEDGER = "chronos.db"


def state_files(directory: Path) -> list[Path]:
    """Every file Chronos keeps in a state directory: the ledger, SQLite's WAL and shared memory,
    the queue leader's lock, and the simulated GPUs' usage file and its lock."""
    return [*(directory / name for name in (_LEDGER, _LEDGER + "-wal", _LEDGER + "-shm")),
            waiting.lock_path(directory / _LEDGER), *(directory / name for name in (STATE_FILE, LOCK_FILE))]


@dataclass(frozen=True)
class InitResult:
    """What ``init_state_dir`` did: the directory, its group, and each file created or put right."""

    directory: Path
    group: str
    created: list[Path] = field(default_factory=list)
    fixed: list[Path] = field(default_factory=list)


def init_state_dir(directory: str | os.PathLike[str], group: str) -> InitResult:
    """Create or repair a group's state directory and its files (root only; never deletes anything)."""
    path = Path(directory)
    if not path.is_absolute():
        raise InvalidRequestError(f"state directory {path} must be an absolute path, e.g. /var/lib/chronos")
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise InvalidRequestError(f"no group {group!r}: create it first (sudo groupadd {group})") from None
    if os.geteuid() != 0:
        raise NotAllowedError(f"only root can set up a state directory: sudo chronos admin init-state-dir "
                              f"{path} --group {group}")
    result = InitResult(path, group)
    try:
        _make_dir(path, gid, result)
        if not os.path.lexists(path / _LEDGER):
            _write_schema(path)
            result.created.append(path / _LEDGER)
        for file in state_files(path):
            _make_file(file, gid, result)
    except OSError as exc:
        raise StateError(f"cannot set up {exc.filename or path}: {exc.strerror}") from None
    return result


def _make_dir(path: Path, gid: int, result: InitResult) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
        result.created.append(path)
    except FileExistsError:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            raise StateError(f"{path} exists and is not a directory; choose another path") from None
        if (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, gid, DIR_MODE):
            return
        result.fixed.append(path)
    os.chown(path, 0, gid, follow_symlinks=False)
    os.chmod(path, DIR_MODE)  # after chown, which clears setgid; and never through the umask


def _make_file(path: Path, gid: int, result: InitResult) -> None:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        result.created.append(path)
    except FileExistsError:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise StateError(f"{path} is not a regular file ({exc.strerror}); refusing to change it") from None
        info = os.fstat(fd)
        regular = stat.S_ISREG(info.st_mode)
        if not regular:
            os.close(fd)
            raise StateError(f"{path} is not a regular file; refusing to change it") from None
        if (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) != (0, gid, FILE_MODE):
            result.fixed.append(path)
    try:
        os.fchown(fd, 0, gid)
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def _write_schema(path: Path) -> None:
    """Make the ledger with its schema now (the ledger builds it aside and links it into place).

    The last connection to close removes SQLite's -wal and -shm files: made again, by root, after.
    """
    engine = Engine(state_dir=path)
    try:
        engine.ledger  # noqa: B018 - opening it creates the schema
    finally:
        engine.close()


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _audit_world_dir(path: Path) -> list[str]:
    """The shared default (1777): every file must be readable and writable by every user."""
    problems = []
    for file in state_files(path):
        try:
            st = os.lstat(file)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o006 != 0o006:
            problems.append(f"{file} is not readable and writable by every user, so the others are refused: "
                            f"ask {_user(st.st_uid)} to run chmod 666 {file}")
    return problems


def audit_state_dir(directory: str | os.PathLike[str]) -> list[str]:
    """One line per thing that keeps a group state directory from working for all its members.

    A directory shared through the world (the 1777 default) must have files every user can write; one
    private to its user is checked where it is used (:mod:`chronos.state`).
    """
    path = Path(directory)
    try:
        info = os.lstat(path)
    except OSError:
        return []
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        return []
    if info.st_mode & stat.S_IWOTH and info.st_mode & stat.S_ISVTX:
        return _audit_world_dir(path)
    if not is_group_dir(info.st_mode):
        return []
    name = group_name(info.st_gid)
    fix = init_hint(path)
    problems = []
    if not info.st_mode & stat.S_ISVTX:
        problems.append(f"state directory {path} has no sticky bit, so any member of {name} can remove or "
                        f"replace the ledger: run {fix}")
    if not info.st_mode & stat.S_ISGID:
        problems.append(f"state directory {path} has no setgid bit, so new files do not belong to {name}: run {fix}")
    if info.st_uid != 0:
        problems.append(f"state directory {path} belongs to uid {info.st_uid}, not root: run {fix}")
    for file in state_files(path):
        try:
            st = os.lstat(file)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"cannot read {file}: {exc.strerror}")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{file} is not a regular file; Chronos refuses it")
        elif st.st_gid != info.st_gid or st.st_mode & 0o060 != 0o060:
            problems.append(f"{file} is not readable and writable by group {name}, so other members are "
                            f"refused: run {fix}")
        elif st.st_uid not in (0, info.st_uid) and not file.name.endswith(("-wal", "-shm")):
            problems.append(f"{file} was made by {_user(st.st_uid)}, who could take it away from the other "
                            f"members: run {fix}")
    return problems
