"""What the service owns on disk and how it meets a client: its socket, its state directory, the peer.

The socket is mode 666 (anyone may connect: who they are comes from the kernel, SO_PEERCRED); the
state directory is the service's alone, so no user can write, replace or split the ledger.
"""

from __future__ import annotations

import os
import resource
import socket
import stat
import struct
from pathlib import Path

from chronos import procs
from chronos.errors import StateError
from chronos.service.handlers import Peer
from chronos.service.protocol import VERSION, dump

__all__ = ["listen", "peer_of", "private_dir", "raise_fd_limit", "refuse"]


def peer_of(sock: socket.socket) -> Peer:
    """The connected process as the kernel gives it: pid (in our namespace), uid, gid."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(uid=uid, gid=gid, pid=pid, started=procs.start_time(pid) or 0.0)


def refuse(sock: socket.socket, message: str) -> None:
    """Answer a connection that will not be served with one error line, and close it."""
    try:
        sock.send(dump({"v": VERSION, "id": None, "ok": False,
                        "error": {"code": "unavailable", "message": message, "exit": 3}}))
    except OSError:
        pass
    sock.close()


def private_dir(path: Path) -> Path:
    """The service's state directory: made if missing, and refused if anyone else may write in it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(path)
    except OSError as exc:
        raise StateError(f"cannot create state directory {path}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise StateError(f"state directory {path} is not a plain directory; refusing it")
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise StateError(f"state directory {path} must belong to the service and be writable by it alone "
                         f"(it is uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}): "
                         f"chown {os.geteuid()} {path} && chmod 700 {path}, or choose another with --state-dir")
    return path


def listen(path: Path) -> socket.socket:
    """Bind ``path`` (a stale socket from a crash is replaced; anything else there is refused), mode 666."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(info.st_mode):
            raise StateError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            os.unlink(path)  # a stale socket: nobody answers on it
        else:
            probe.close()
            raise StateError(f"a Chronos service already answers on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise StateError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o666)  # every user may connect; who they are comes from the kernel
    os.chmod(path.parent, os.stat(path.parent).st_mode | 0o011)
    sock.listen(socket.SOMAXCONN)
    sock.setblocking(False)
    return sock


def raise_fd_limit(want: int) -> None:
    """Room for ``want`` descriptors, as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        except (ValueError, OSError):
            pass
