"""Who is asking: OS users, groups and admin rights."""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache

from chronos.errors import InvalidRequestError

__all__ = ["User", "acting_as", "current_user", "groups_of", "is_admin", "lookup_user"]


@dataclass(frozen=True)
class User:
    uid: int
    name: str


@lru_cache(maxsize=64)
def _name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


#: The user a service request is served for (set from the kernel's word, SO_PEERCRED), else None.
_acting: ContextVar[User | None] = ContextVar("chronos_acting_user", default=None)


def current_user() -> User:
    """Who is asking: this process's real user, or, while the service serves a request, its caller."""
    acting = _acting.get()
    if acting is not None:
        return acting
    uid = os.getuid()
    return User(uid, _name_of(uid))


@contextmanager
def acting_as(uid: int) -> Iterator[User]:
    """Serve the code inside as the user ``uid`` (a uid the kernel vouched for, never a request's word)."""
    token = _acting.set(User(uid, _name_of(uid)))
    try:
        yield _acting.get() or User(uid, _name_of(uid))
    finally:
        _acting.reset(token)


def lookup_user(name: str) -> User:
    """A user by name or numeric uid; unknown names are bad input."""
    if not isinstance(name, str) or not name or len(name) > 256:
        raise InvalidRequestError(f"no such user {str(name)[:40]!r} on this machine: give a user name such as ann")
    try:
        entry = pwd.getpwnam(name)
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        if name.isascii() and name.isdigit() and int(name) < 2**32:
            return User(int(name), _name_of(int(name)))
        raise InvalidRequestError(f"no such user {name[:40]!r} on this machine") from None
    return User(entry.pw_uid, entry.pw_name)


def groups_of(user: User) -> set[str]:
    """Names of the groups ``user`` belongs to (primary and supplementary)."""
    names: set[str] = set()
    try:
        entry = pwd.getpwuid(user.uid)
        names.add(grp.getgrgid(entry.pw_gid).gr_name)
        names.update(g.gr_name for g in grp.getgrall() if entry.pw_name in g.gr_mem)
    except KeyError:
        pass
    return names


def is_admin(user: User, admin_group: str | None) -> bool:
    """Root, or a member of the configured admin group."""
    if user.uid == 0:
        return True
    if not admin_group:
        return False
    try:
        group = grp.getgrnam(admin_group)
    except KeyError:
        return False
    if user.name in group.gr_mem:
        return True
    try:
        return pwd.getpwuid(user.uid).pw_gid == group.gr_gid
    except KeyError:
        return False
