"""Simulated GPUs for machines without one: tests, CI, demos, laptops.

The GPUs are described by ``CHRONOS_SIM_GPUS``: a comma-separated list of sizes, each optionally
repeated, e.g. ``80G,40G`` (two devices) or ``4x80G`` (four). Unset or empty means ``2x80G``.

Memory "used" on a simulated GPU is whatever live processes claimed with :func:`allocate`. The
claims live in ``simulated-gpus.json`` in the state directory so that every process (and every OS
user sharing the directory) sees the same GPUs, exactly as every process sees the same real GPU:

* a write takes an ``fcntl`` lock on ``simulated-gpus.json.lock`` and replaces the file atomically
  (temp file + ``os.replace``); readers take no lock. In a sticky shared directory another user's
  file cannot be replaced, so the file is then rewritten in place under the lock and a reader that
  catches it half-written re-reads under a shared lock.
* each claim records the pid *and* its start time, so a reused pid is not mistaken for the
  claimant; claims of dead processes are ignored on read and pruned on the next write.
* files get the read/write bits of the directory (``0o600`` in a private ``0o700`` directory,
  ``0o666`` in a shared ``0o1777`` one).

``allocate`` sets a process's usage on a device (it does not add), and may go past the device's
total: real processes over-commit too, and the watchdog must see it.

Utilisation is honest but crude: a process declares how busy it keeps a device's SMs with
:func:`set_utilization` (or ``allocate(..., utilization=N)``), shared across processes like memory;
``utilization()`` reports each live process's declared figure (0 when it declared none) and a device
the sum, capped at 100. Nothing is computed on a simulated GPU, so nothing else is reported.

Topology comes from ``CHRONOS_SIM_TOPOLOGY``: comma-separated groups of device indices joined by
``-``. A plain group (or one prefixed ``nvlink:``) shares NVLink; a group prefixed ``pcie:`` shares
a PCIe switch. ``0-1,2-3`` gives two NVLink pairs; ``nvlink:0-1-2-3,pcie:4-5`` a group of four and a
switch pair. When the variable is set, pairs in no common group are ``LINK_SYSTEM`` (across
sockets); when it is unset, every pair is ``LINK_PCIE_MULTI`` (one host bridge, no NVLink).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chronos import procs
from chronos.devices.base import (
    LINK_NVLINK,
    LINK_PCIE_MULTI,
    LINK_PCIE_SWITCH,
    LINK_SAME,
    LINK_SYSTEM,
    Device,
    GpuProcess,
    ProcessUtilization,
)
from chronos.errors import InvalidRequestError, StateError
from chronos.settings import Settings, current
from chronos.state import check_dir, file_mode_for
from chronos.units import format_bytes, parse_memory

__all__ = [
    "DEFAULT_SIM_GPUS",
    "STATE_FILE",
    "SimulatedBackend",
    "allocate",
    "free",
    "parse_sim_gpus",
    "parse_topology",
    "set_utilization",
]

DEFAULT_SIM_GPUS = "2x80G"
STATE_FILE = "simulated-gpus.json"
LOCK_FILE = STATE_FILE + ".lock"
_MAX_DEVICES = 256
_UUID_NAMESPACE = uuid.UUID("5b0f3c2e-6a1d-4f0e-9d55-63a7c1f0b001")
_COUNT_RE = re.compile(r"^\s*(\d+)\s*[x×*]\s*(.+)$", re.IGNORECASE)
_TOPO_KINDS = {"nvlink": LINK_NVLINK, "pcie": LINK_PCIE_SWITCH}


@dataclass(frozen=True)
class _Claim:
    pid: int
    started: float | None
    nbytes: int
    utilization: int | None


# --------------------------------------------------------------------------- parsing


def parse_sim_gpus(value: str | None) -> list[int]:
    """Device sizes in bytes from a ``CHRONOS_SIM_GPUS`` value (None or blank: the default)."""
    text = (value or "").strip() or DEFAULT_SIM_GPUS
    sizes: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise _bad_gpus(text, "an empty entry")
        count = 1
        match = _COUNT_RE.match(item)
        if match:
            digits = match.group(1)
            count = int(digits) if len(digits) <= 6 else _MAX_DEVICES + 1
            item = match.group(2).strip()
            if count < 1:
                raise _bad_gpus(text, f"a count of {count}")
            if len(sizes) + count > _MAX_DEVICES:
                raise _bad_gpus(text, f"more than {_MAX_DEVICES} devices")
        try:
            spec = parse_memory(item)
        except InvalidRequestError:
            raise _bad_gpus(text, f"the size {item[:40]!r}") from None
        if spec.nbytes is None:
            raise _bad_gpus(text, f"the fraction {item!r} (a device needs a size)")
        sizes.extend([spec.nbytes] * count)
        if len(sizes) > _MAX_DEVICES:
            raise _bad_gpus(text, f"more than {_MAX_DEVICES} devices")
    return sizes


def _bad_gpus(text: str, what: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"CHRONOS_SIM_GPUS={text[:60]!r} has {what}: write device sizes such as 80G,40G or 4x80G"
    )


def parse_topology(value: str | None, count: int) -> list[list[int]]:
    """The ``count`` x ``count`` distance matrix described by a ``CHRONOS_SIM_TOPOLOGY`` value."""
    text = (value or "").strip()
    outside = LINK_SYSTEM if text else LINK_PCIE_MULTI
    matrix = [[LINK_SAME if i == j else outside for j in range(count)] for i in range(count)]
    if not text:
        return matrix
    for raw in text.split(","):
        group = raw.strip()
        kind = "nvlink"
        if ":" in group:
            kind, _, group = group.partition(":")
            kind = kind.strip().lower()
            if kind not in _TOPO_KINDS:
                raise _bad_topology(text, f"the link kind {kind!r} (use nvlink: or pcie:)")
        members: list[int] = []
        for part in group.split("-"):
            part = part.strip()
            if not (part.isascii() and part.isdigit()) or len(part) > 6:
                raise _bad_topology(text, f"the group {raw.strip()[:20]!r}")
            index = int(part)
            if index >= count:
                raise _bad_topology(text, f"device {index}, but there are only {count} simulated GPUs")
            members.append(index)
        if len(set(members)) < 2:
            raise _bad_topology(text, f"the group {raw.strip()!r} of fewer than two devices")
        link = _TOPO_KINDS[kind]
        for a in members:
            for b in members:
                if a != b:
                    matrix[a][b] = min(matrix[a][b], link)
    return matrix


def _bad_topology(text: str, what: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"CHRONOS_SIM_TOPOLOGY={text[:60]!r} has {what}: write groups such as 0-1,2-3 or nvlink:0-1,pcie:2-3"
    )


def device_uuid(index: int, nbytes: int) -> str:
    """A stable UUID in NVML's format for simulated device ``index`` of ``nbytes``."""
    return f"GPU-{uuid.uuid5(_UUID_NAMESPACE, f'{index}:{nbytes}')}"


# --------------------------------------------------------------------------- the shared file


def _read_raw(path: Path) -> dict[str, Any]:
    """The parsed state file; empty when missing. A torn in-place write is re-read under the lock."""
    data = _read_bytes(path)
    try:
        parsed = json.loads(data) if data else {}
    except ValueError:
        with _locked(path.parent, shared=True):
            data = _read_bytes(path)
        try:
            parsed = json.loads(data) if data else {}
        except ValueError:
            raise StateError(f"{path} is corrupt; delete it to reset simulated GPU usage") from None
    return parsed if isinstance(parsed, dict) else {}


def _read_bytes(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateError(f"{path} is a symbolic link; remove it") from None
        if exc.errno == errno.EACCES:
            check_dir(path.parent, shared=False)  # says which group to ask for, where that is the reason
        raise StateError(f"cannot read {path}: {exc.strerror}") from None
    try:
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(directory: Path, shared: bool = False) -> Iterator[None]:
    """Hold the lock next to the state file: exclusive for writers, shared for a re-reading reader."""
    lock_path = directory / LOCK_FILE
    flags = (os.O_RDONLY if shared else os.O_RDWR) | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(lock_path, flags)
        except FileNotFoundError:
            # O_CREAT only when missing: with fs.protected_regular, O_CREAT on another user's file
            # in a sticky directory is refused even though the file itself is writable.
            try:
                fd = os.open(lock_path, flags | os.O_CREAT | os.O_EXCL, file_mode_for(directory))
            except FileExistsError:
                fd = os.open(lock_path, flags)
    except OSError as exc:
        raise StateError(f"cannot open lock file {lock_path}: {exc.strerror}") from None
    try:
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, file_mode_for(directory))
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _write_raw(path: Path, payload: dict[str, Any]) -> None:
    data = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    mode = file_mode_for(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".simulated-gpus.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StateError(f"cannot write in {path.parent}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), mode)
        try:
            os.replace(tmp, path)
            return
        except PermissionError:
            pass  # sticky directory, another user's file: rewrite it in place below
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StateError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.truncate()


def _claims(raw: dict[str, Any]) -> dict[int, list[_Claim]]:
    """Claims per device from the raw file, every entry checked for shape (bad ones dropped)."""
    out: dict[int, list[_Claim]] = {}
    usage = raw.get("usage")
    if not isinstance(usage, dict):
        return out
    for dev_key, per_pid in usage.items():
        if not (isinstance(dev_key, str) and dev_key.isdigit() and isinstance(per_pid, dict)):
            continue
        claims: list[_Claim] = []
        for pid_key, entry in per_pid.items():
            if not (isinstance(pid_key, str) and pid_key.isdigit() and isinstance(entry, dict)):
                continue
            nbytes = entry.get("bytes")
            started = entry.get("started")
            util = entry.get("util")
            if not isinstance(nbytes, int) or nbytes < 0:
                continue
            claims.append(_Claim(
                pid=int(pid_key),
                started=float(started) if isinstance(started, (int, float)) else None,
                nbytes=nbytes,
                utilization=int(util) if isinstance(util, (int, float)) else None,
            ))
        out[int(dev_key)] = claims
    return out


def _live(claims: dict[int, list[_Claim]]) -> dict[int, list[_Claim]]:
    """Only claims whose process still runs (same pid, same start time); one check per pid."""
    alive: dict[tuple[int, float | None], bool] = {}
    out: dict[int, list[_Claim]] = {}
    for dev, items in claims.items():
        kept = []
        for claim in items:
            key = (claim.pid, claim.started)
            if key not in alive:
                alive[key] = procs.is_alive(claim.pid, claim.started)
            if alive[key]:
                kept.append(claim)
        if kept:
            out[dev] = kept
    return out


def _serialise(claims: dict[int, list[_Claim]]) -> dict[str, Any]:
    usage: dict[str, dict[str, dict[str, Any]]] = {}
    for dev, items in sorted(claims.items()):
        entries: dict[str, dict[str, Any]] = {}
        for c in items:
            entry: dict[str, Any] = {"bytes": c.nbytes, "started": c.started}
            if c.utilization is not None:
                entry["util"] = c.utilization
            entries[str(c.pid)] = entry
        if entries:
            usage[str(dev)] = entries
    return {"version": 1, "usage": usage}


# --------------------------------------------------------------------------- public API


def _check_size(nbytes: int | str, what: str) -> int:
    if isinstance(nbytes, str):
        spec = parse_memory(nbytes)
        if spec.nbytes is None:
            raise InvalidRequestError(f"{what} needs a size such as 8G, not the fraction {nbytes!r}")
        return spec.nbytes
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise InvalidRequestError(f"{what} needs a byte count of 0 or more, got {nbytes!r}")
    return nbytes


def _check_percent(percent: int | None) -> int | None:
    if percent is not None and (isinstance(percent, bool) or not isinstance(percent, int)
                                or not 0 <= percent <= 100):
        raise InvalidRequestError(f"utilization must be a whole percentage from 0 to 100, got {percent!r}")
    return percent


def _simulated() -> SimulatedBackend:
    """The simulated GPUs this process's settings describe."""
    return SimulatedBackend.from_settings(current())


def allocate(device: int, nbytes: int | str, pid: int | None = None, *,
             utilization: int | None = None) -> None:
    """Make ``pid`` (default: the caller) use ``nbytes`` on simulated ``device``, replacing its old figure.

    ``nbytes`` may be a size string such as ``"8G"``. Past the device's total is allowed on purpose:
    real processes over-commit, and the watchdog must be able to see it. ``utilization`` (0-100) is
    the percentage this process declares it keeps the device busy.
    """
    _simulated().allocate(device, nbytes, pid, utilization=utilization)


def set_utilization(device: int, percent: int, pid: int | None = None) -> None:
    """Make ``pid`` (default: the caller) keep simulated ``device``'s SMs ``percent`` busy (0-100).

    The process's memory on the device is left as it is; 0 says it is idle.
    """
    _simulated().set_utilization(device, percent, pid)


def free(device: int, pid: int | None = None) -> None:
    """Drop ``pid``'s (default: the caller's) usage on simulated ``device``."""
    _simulated().free(device, pid)


class SimulatedBackend:
    """GPUs that exist only in a ``CHRONOS_SIM_GPUS`` description and the shared usage file.

    ``gpus`` and ``topology`` are the descriptions (None: the default two 80 GiB GPUs, no NVLink);
    ``state_dir`` is where the usage file lives, created shared (1777) when ``shared``.
    """

    name = "simulated"

    def __init__(self, gpus: str | None, topology: str | None, state_dir: Path, *, shared: bool = False) -> None:
        self.sizes = parse_sim_gpus(gpus)
        self._distances = parse_topology(topology, len(self.sizes))
        self._uuids = [device_uuid(i, n) for i, n in enumerate(self.sizes)]
        self._names = [f"Chronos Simulated GPU ({format_bytes(n)})" for n in self.sizes]
        self._state_dir = Path(state_dir)
        self._state_file = self._state_dir / STATE_FILE  # read on every poll: joined once
        #: The live claims of the last :meth:`devices` call and what they gave (every write asks).
        self._last_devices: tuple[dict[int, list[_Claim]], tuple[Device, ...]] | None = None
        self._shared = shared

    @classmethod
    def from_settings(cls, settings: Settings) -> SimulatedBackend:
        return cls(settings.sim_gpus, settings.sim_topology, settings.state_dir,
                   shared=not settings.config.state_dir_explicit)

    # -- claims --------------------------------------------------------------------------
    def allocate(self, device: int, nbytes: int | str, pid: int | None = None, *,
                 utilization: int | None = None) -> None:
        """See :func:`allocate`."""
        self._update(device, pid, _check_size(nbytes, "allocate"), _check_percent(utilization))

    def set_utilization(self, device: int, percent: int, pid: int | None = None) -> None:
        """See :func:`set_utilization`."""
        if percent is None:
            raise InvalidRequestError("utilization must be a whole percentage from 0 to 100, got None")
        self._update(device, pid, None, _check_percent(percent))

    def free(self, device: int, pid: int | None = None) -> None:
        """See :func:`free`."""
        self._update(device, pid, 0, None, drop=True)

    def _update(self, device: int, pid: int | None, nbytes: int | None, utilization: int | None,
                *, drop: bool = False) -> None:
        """Set one process's claim on one device (None keeps the figure it had), pruning the dead; a claim
        of no memory and no declared use, or ``drop``, is removed."""
        if isinstance(device, bool) or not isinstance(device, int) or not 0 <= device < len(self.sizes):
            raise InvalidRequestError(
                f"no simulated GPU {device!r}: there are {len(self.sizes)} (indices 0-{len(self.sizes) - 1}); "
                "set CHRONOS_SIM_GPUS to change them"
            )
        if pid is None:
            pid = os.getpid()
        started = procs.start_time(pid)
        if started is None and (nbytes or utilization):
            raise InvalidRequestError(f"no running process with pid {pid}")
        directory = check_dir(self._state_dir, shared=self._shared)
        path = directory / STATE_FILE
        with _locked(directory):
            claims = _live(_claims(_read_raw(path)))
            old = next((c for c in claims.get(device, []) if c.pid == pid), None)
            items = [c for c in claims.get(device, []) if c.pid != pid]
            if nbytes is None:
                nbytes = old.nbytes if old is not None else 0
            if utilization is None and old is not None and nbytes:
                utilization = old.utilization
            if not drop and (nbytes or utilization):
                items.append(_Claim(pid=pid, started=started, nbytes=nbytes, utilization=utilization))
            claims[device] = items
            _write_raw(path, _serialise(claims))

    def _live_claims(self) -> dict[int, list[_Claim]]:
        return _live(_claims(_read_raw(self._state_file)))

    # -- the Backend interface -----------------------------------------------------------
    def devices(self) -> list[Device]:
        claims = self._live_claims()
        last = self._last_devices
        if last is not None and last[0] == claims:  # the same claims give the same (frozen) devices
            return list(last[1])
        out = []
        for i, total in enumerate(self.sizes):
            items = claims.get(i, [])
            util = min(100, sum(c.utilization or 0 for c in items))
            out.append(Device(
                index=i,
                uuid=self._uuids[i],
                name=self._names[i],
                memory_total_bytes=total,
                memory_used_bytes=sum(c.nbytes for c in items),
                utilization_percent=util,
            ))
        self._last_devices = (claims, tuple(out))
        return out

    def processes(self, indices: list[int] | None = None) -> list[GpuProcess]:
        wanted = range(len(self.sizes)) if indices is None else indices
        claims = self._live_claims()
        out = []
        for i in wanted:
            if not 0 <= i < len(self.sizes):
                raise InvalidRequestError(f"no simulated GPU {i}: there are {len(self.sizes)}")
            for c in sorted(claims.get(i, []), key=lambda c: c.pid):
                out.append(GpuProcess(device_index=i, device_uuid=self._uuids[i], pid=c.pid,
                                      used_bytes=c.nbytes))
        return out

    def utilization(self, indices: list[int] | None = None) -> list[ProcessUtilization]:
        wanted = range(len(self.sizes)) if indices is None else indices
        claims = self._live_claims()
        out = []
        for i in wanted:
            if not 0 <= i < len(self.sizes):
                raise InvalidRequestError(f"no simulated GPU {i}: there are {len(self.sizes)}")
            for c in sorted(claims.get(i, []), key=lambda c: c.pid):
                out.append(ProcessUtilization(device_index=i, device_uuid=self._uuids[i], pid=c.pid,
                                              sm_percent=c.utilization or 0))
        return out

    def distances(self) -> list[list[int]]:
        return [row[:] for row in self._distances]

    def driver_version(self) -> str | None:
        return None
