"""Whether a configuration file is the administrator's: only root could have written it, or put it there.

Admin groups and limits come from the system file, so a file a user could write (their own, one in
a directory they can write, ``/dev/null``) must never be taken for it. A path passes when the file
is a regular file owned by root and writable by nobody else, and every directory above it belongs
to root and is writable by nobody else or sticky (like ``/tmp``, where only an entry's owner may
rename or remove it). A missing file passes when only root could create it: its nearest existing
directory belongs to root and is writable by nobody else. Symlinks are followed first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["untrusted"]

_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def _loose(info: os.stat_result) -> bool:
    """Writable by someone other than root: not root's, or group-writable for a group other than root's."""
    if info.st_uid != 0:
        return True
    return bool(info.st_mode & stat.S_IWOTH or (info.st_mode & stat.S_IWGRP and info.st_gid != 0))


def untrusted(path: str | os.PathLike[str]) -> str | None:
    """Why a user other than root could have written or placed ``path`` (None: only root could)."""
    real = Path(os.path.realpath(path))
    try:
        info: os.stat_result | None = os.stat(real)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        return f"it cannot be checked ({exc.strerror})"
    if info is not None:
        if not stat.S_ISREG(info.st_mode):
            return "it is not a regular file"
        if info.st_uid != 0:
            return f"it belongs to uid {info.st_uid}, not root"
        if _loose(info):
            return "users other than root can write it"
    directory, creatable = real.parent, info is None
    while True:
        try:
            dir_info = os.stat(directory)
        except FileNotFoundError:
            directory = directory.parent
            continue
        except OSError as exc:
            return f"{directory} cannot be checked ({exc.strerror})"
        if dir_info.st_uid != 0:
            return f"directory {directory} belongs to uid {dir_info.st_uid}, not root"
        if _loose(dir_info) and (creatable or not dir_info.st_mode & stat.S_ISVTX):
            return f"users other than root can {'create files in' if creatable else 'replace files in'} {directory}"
        creatable = False
        if directory == directory.parent:
            return None
        directory = directory.parent
