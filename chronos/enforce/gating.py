"""Device gating: a user may open ``/dev/nvidiaN`` only while holding a lease on GPU N.

Where the administrator has made the device files not world-accessible (``NVreg_DeviceFileMode=0660``
or a udev rule), the service gives each lease's owner a POSIX ACL entry (``user:UID:rw-``) on the
files of the lease's GPUs while the lease is active, and takes it away at its end. The ACL is the
``system.posix_acl_access`` extended attribute, read and written here directly (the kernel's
format: a version, then tag/permission/id entries), so no ``acl`` package is needed.

With gating on, Chronos owns the named-*user* entries of those files: an entry for a user who holds
no active lease on the GPU is removed by the next :meth:`DeviceGate.sync`. Standing access is given
through a group (named-group entries, and the file's own owner, group and mode, are left alone).

Taking the entry away does not close a file already open, so :meth:`DeviceGate.holders` finds the
processes that still hold a device file their owner may no longer open; the service's enforcer ends
them. The directory is a setting (``[enforce] device_dir``) so that the mechanics can be tested on
stand-in files.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import re
import stat
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from chronos import procs
from chronos.errors import StateError
from chronos.model import LeaseRecord, LeaseState

__all__ = ["ACL_XATTR", "DRIVER_PARAMS", "DeviceGate", "Holder", "driver_restores_modes", "may_open"]

ACL_XATTR = "system.posix_acl_access"
#: The NVIDIA driver's module parameters, as the loaded module reports them.
DRIVER_PARAMS = Path("/proc/driver/nvidia/params")
_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_UNDEFINED = 0xFFFFFFFF
_RW = 0o6
_ENTRY = struct.Struct("<HHI")
_DEVICE_NAME = re.compile(r"^nvidia(\d+)$")

Entry = tuple[int, int, int]  # tag, permissions (rwx bits), id


def _read_acl(path: Path) -> list[Entry]:
    """The file's access ACL, or the three entries its mode stands for when it has none."""
    try:
        raw = os.getxattr(path, ACL_XATTR)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
            raise
        mode = os.stat(path).st_mode
        return [(_USER_OBJ, (mode >> 6) & 7, _UNDEFINED), (_GROUP_OBJ, (mode >> 3) & 7, _UNDEFINED),
                (_OTHER, mode & 7, _UNDEFINED)]
    if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != _VERSION or (len(raw) - 4) % _ENTRY.size:
        raise StateError(f"{path}: its access ACL is not in a format Chronos knows")
    return [_ENTRY.unpack_from(raw, 4 + i * _ENTRY.size) for i in range((len(raw) - 4) // _ENTRY.size)]


def _write_acl(path: Path, entries: Iterable[Entry]) -> None:
    """Write ``entries`` (a mask recomputed, or dropped with the last named entry), in the kernel's order."""
    kept = [e for e in entries if e[0] != _MASK]
    named = [e for e in kept if e[0] in (_USER, _GROUP)]
    if named:
        mask = 0
        for tag, perm, _ in kept:
            if tag in (_USER, _GROUP, _GROUP_OBJ):
                mask |= perm
        kept.append((_MASK, mask, _UNDEFINED))
    kept.sort(key=lambda e: (e[0], e[2]))
    data = struct.pack("<I", _VERSION) + b"".join(_ENTRY.pack(*e) for e in kept)
    # A minimal ACL (no named entries) is turned back into the mode by the kernel, xattr removed.
    os.setxattr(path, ACL_XATTR, data)


def _gids(uid: int) -> set[int]:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return set()
    return {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem}


def may_open(path: Path, uid: int, gids: set[int] | None = None, want: int = _RW) -> bool:
    """Would ``uid`` be let open ``path`` for ``want`` (read and write: what CUDA asks) now?

    POSIX.1e's access check over the file's mode and ACL: the owner's entry, else a named user's
    (under the mask), else any matching group entry, else other. Root may always.
    """
    if uid == 0:
        return True
    try:
        info = os.stat(path)
        entries = _read_acl(path)
    except OSError:
        return False
    mask = next((perm for tag, perm, _ in entries if tag == _MASK), 7)
    if uid == info.st_uid:
        return next(perm for tag, perm, _ in entries if tag == _USER_OBJ) & want == want
    for tag, perm, ident in entries:
        if tag == _USER and ident == uid:
            return perm & mask & want == want
    groups = _gids(uid) if gids is None else gids
    matched = False
    for tag, perm, ident in entries:
        if (tag == _GROUP_OBJ and info.st_gid in groups) or (tag == _GROUP and ident in groups):
            matched = True
            if perm & mask & want == want:
                return True
    if matched:
        return False
    return next(perm for tag, perm, _ in entries if tag == _OTHER) & want == want


def driver_restores_modes(params: Path = DRIVER_PARAMS) -> bool:
    """Does the loaded driver say ``ModifyDeviceFiles: 1``?

    Then NVIDIA's libraries, whenever a root program starts NVML or CUDA (this service's own
    enforcer included), make the device files match ``DeviceFileMode`` again: on an H200 with
    driver 580 a ``0660`` /dev/nvidia0 was ``0666`` after every root ``nvmlInit`` or ``cuInit``
    (docs/gpu-validation.md). Gating cannot hold there without ``NVreg_ModifyDeviceFiles=0``
    or ``[enforce] device_mode``, which puts the mode back every pass (:meth:`DeviceGate.keep_mode`).
    """
    try:
        text = params.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "ModifyDeviceFiles":
            return value.strip() == "1"
    return False


@dataclass(frozen=True)
class Holder:
    """A process that has GPU ``index``'s device file open while its (effective) user may not open it."""

    pid: int
    started: float
    uid: int
    index: int


class DeviceGate:
    """The ACLs on ``device_dir``'s ``nvidiaN`` files, kept equal to the active leases."""

    def __init__(self, device_dir: str | Path, driver_params: Path = DRIVER_PARAMS) -> None:
        self.device_dir = Path(device_dir)
        self.driver_params = driver_params

    def paths(self) -> dict[int, Path]:
        """Every GPU's device file in the directory, by index."""
        found: dict[int, Path] = {}
        try:
            with os.scandir(self.device_dir) as entries:
                for entry in entries:
                    match = _DEVICE_NAME.match(entry.name)
                    if match:
                        found[int(match.group(1))] = Path(entry.path)
        except OSError as exc:
            raise StateError(f"device gating: cannot list {self.device_dir}: {exc.strerror}") from None
        return dict(sorted(found.items()))

    def sync(self, active: Sequence[LeaseRecord]) -> list[str]:
        """Give each active lease's owner ``rw`` on its GPUs' files and take it from everyone else;
        returns one line per change. An ACL that cannot be written is a :class:`StateError`."""
        wanted: dict[int, set[int]] = {}
        for lease in active:
            if lease.state == LeaseState.ACTIVE:
                for index in lease.devices:
                    wanted.setdefault(index, set()).add(lease.uid)
        changes: list[str] = []
        for index, path in self.paths().items():
            want = wanted.get(index, set())
            try:
                entries = _read_acl(path)
                have = {ident for tag, _, ident in entries if tag == _USER}
                if have == want:
                    continue
                kept = [e for e in entries if e[0] != _USER or e[2] in want]
                kept += [(_USER, _RW, uid) for uid in sorted(want - have)]
                _write_acl(path, kept)
            except OSError as exc:
                hint = ("run it in the Chronos service (root)" if exc.errno == errno.EPERM
                        else "the file system does not support POSIX ACLs" if exc.errno == errno.EOPNOTSUPP
                        else "check the device file")
                raise StateError(f"device gating: cannot set the ACL of {path}: {exc.strerror}; {hint}, or turn "
                                 "[enforce] gate_devices off") from None
            for uid in sorted(want - have):
                changes.append(f"{path}: access for uid {uid}")
            for uid in sorted(have - want):
                changes.append(f"{path}: access of uid {uid} removed")
        return changes

    def open_to_all(self) -> list[Path]:
        """The device files anyone may open (mode o+rw): gating cannot keep anyone off those."""
        out = []
        for path in self.paths().values():
            try:
                mode = os.stat(path).st_mode
            except OSError:
                continue
            if mode & stat.S_IROTH and mode & stat.S_IWOTH:
                out.append(path)
        return out

    def keep_mode(self, mode: int) -> list[str]:
        """Put each file's mode back to ``mode`` where something changed it (a root program's NVML or
        CUDA start under ``ModifyDeviceFiles=1``); returns one line per file changed. The ACL's named
        entries stay: a chmod only sets its mask from the group bits, which ``mode`` keeps rw."""
        changed = []
        for path in self.paths().values():
            try:
                now = stat.S_IMODE(os.stat(path).st_mode)
                if now != mode:
                    os.chmod(path, mode)
                    changed.append(f"device gating: {path} was {now:04o}, made {mode:04o} again "
                                   "([enforce] device_mode)")
            except OSError as exc:
                raise StateError(f"device gating: cannot set the mode of {path}: {exc.strerror}") from None
        return changed

    def problems(self, *, mode_kept: bool = False) -> list[str]:
        """One line for each reason gating cannot keep a user off a GPU now (empty when it can).
        ``mode_kept``: the enforcer puts the modes back every pass, so the driver's resets are healed."""
        out = [f"device gating: {path} is open to every user (mode o+rw), so gating cannot keep anyone off it; "
               "make it 0660 (NVreg_DeviceFileMode=0660 or a udev rule, or [enforce] device_mode)"
               for path in self.open_to_all()]
        if not mode_kept and driver_restores_modes(self.driver_params):
            out.append(f"device gating: the NVIDIA driver has ModifyDeviceFiles=1 ({self.driver_params}), so every "
                       "root program that starts NVML or CUDA, this service included, makes the device files "
                       "0666 again; set NVreg_ModifyDeviceFiles=0, or [enforce] device_mode = \"0660\" "
                       "(docs/enforcement.md, Device gating)")
        return out

    def holders(self, allowed: Callable[[int, int], bool] = lambda uid, index: False) -> list[Holder]:
        """Processes holding a GPU's device file open whose user may not open it now.

        ``allowed(uid, index)`` says who may whatever the ACL says (a lease just granted). Only the
        processes of users who lack access to some device have their open files looked at, so the
        scan stays cheap on a busy machine.
        """
        paths = self.paths()
        by_target = {str(path): index for index, path in paths.items()}
        by_target.update({os.path.realpath(path): index for index, path in paths.items()})
        denied: dict[int, set[int]] = {}
        out: list[Holder] = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            try:
                uid = os.stat(f"/proc/{name}").st_uid
            except OSError:
                continue
            if uid == 0:
                continue
            if uid not in denied:
                gids = _gids(uid)
                denied[uid] = {i for i, p in paths.items() if not allowed(uid, i) and not may_open(p, uid, gids)}
            if not denied[uid]:
                continue
            for index in _open_devices(pid, by_target) & denied[uid]:
                started = procs.start_time(pid)
                if started is not None:
                    out.append(Holder(pid, started, uid, index))
        return out


def _open_devices(pid: int, by_target: dict[str, int]) -> set[int]:
    found: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        index = by_target.get(target)
        if index is not None:
            found.add(index)
    return found
