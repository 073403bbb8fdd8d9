"""A lease made true inside the current process, and undone again.

``with lease.activate(): ...`` (or :meth:`Activation.start` / :meth:`Activation.stop`) sets the
lease's environment in ``os.environ`` (CUDA_VISIBLE_DEVICES and the framework caps, so that
frameworks imported later are capped and children inherit it), caps frameworks already imported,
and starts a watchdog thread. Stopping stops the watchdog and puts back the environment as it
was. The notebook magics are a parser and a renderer over this; a plain script uses it the same.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import TracebackType

from chronos.enforce.watchdog import Watchdog, WatchdogEvent
from chronos.errors import ChronosError
from chronos.lease import Lease
from chronos.model import Action

__all__ = ["Activation", "cuda_initialised"]


def cuda_initialised() -> str | None:
    """The framework that has already initialised CUDA in this process, if any."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():
                return "torch"
        except Exception:  # a broken or partial torch import says nothing about CUDA
            return None
    return None


class Activation:
    """What applying ``lease`` changed in this process, so it can be undone.

    ``on_overuse`` is what the watchdog does when the process's tree passes the cap (default
    ``interrupt``: a KeyboardInterrupt in the running code rather than a kill); at the lease's end
    the machine's ``on_expiry`` applies. ``watch=False`` starts no watchdog. ``notes`` says, one
    line each, what was capped and what could not be.
    """

    def __init__(self, lease: Lease, *, on_overuse: Action | str = Action.INTERRUPT,
                 on_event: Callable[[WatchdogEvent], None] | None = None, watch: bool = True) -> None:
        self.lease = lease
        self.on_overuse = Action.parse(on_overuse, "overuse action")
        self.on_event = on_event
        self.watch = watch
        self.watchdog: Watchdog | None = None
        self.notes: list[str] = []
        self._saved: dict[str, str | None] = {}

    def start(self) -> Activation:
        """Environment, caps, watchdog; returns self."""
        lease = self.lease
        where = ", ".join(map(str, lease.devices))
        for key, value in sorted(lease.env({}).items()):
            if key == "CUDA_VISIBLE_DEVICES":
                framework = cuda_initialised()
                if framework is not None:
                    self.notes.append(
                        f"warning: {framework} has already initialised CUDA in this process, so it still "
                        f"sees every GPU; restart and activate the lease before using the GPU (the lease is "
                        f"GPU {where})"
                    )
                    continue
            self._set(key, value)
        if "CUDA_VISIBLE_DEVICES" in self._saved:
            self.notes.append(f"caps: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} (GPU {where} only, "
                              "for this process and its children)")
        self.notes.extend(self.reapply(first=True))
        if self.watch:
            try:
                self.watchdog = Watchdog(lease, on_overuse=self.on_overuse, on_event=self.on_event).start()
            except ChronosError as exc:
                self.notes.append(f"warning: watchdog not started: {exc}")
        return self

    def reapply(self, *, first: bool = False) -> list[str]:
        """Put this lease's environment and caps back in force (after a nested lease ended).

        Returns notes: what was capped on the first call, and any failure.
        """
        if not first:
            for key, value in self.lease.env({}).items():
                if key in self._saved:
                    os.environ[key] = value
        try:
            capped = self.lease.apply_caps()
        except ChronosError as exc:
            return [f"warning: caps not applied: {exc}"]
        return _summarise(capped) if first else []

    def stop(self) -> None:
        """Stop the watchdog and restore the environment as it was before :meth:`start`."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved.clear()

    def _set(self, key: str, value: str) -> None:
        if key not in self._saved:
            self._saved[key] = os.environ.get(key)
        os.environ[key] = value

    def __enter__(self) -> Activation:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _summarise(capped: list[str]) -> list[str]:
    """apply_caps' lines, with the ones about frameworks not yet imported folded into one."""
    now = [line for line in capped if "for a later" not in line]
    later = sorted({line.split(":", 1)[0] for line in capped if "for a later import" in line})
    notes = [f"caps: {line}" for line in now]
    if later:
        notes.append(f"caps: {', '.join(later)} will be capped when imported (limits set in the environment)")
    return notes
