"""The ChronosProvisioner's settings: each kernel.json config key is a configurable trait too.

An admin can set defaults in jupyter_server_config.py (``c.ChronosProvisioner.memory = "8G"``); a
kernelspec's own ``config`` wins over them.
"""

from __future__ import annotations

from typing import Any

from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from traitlets import Bool, Enum, Float, Int, List, Unicode, Union

from chronos.model import Action, OnIdle, Priority

__all__ = ["ProvisionerSettings"]


class ProvisionerSettings(LocalProvisioner):
    """The traits of :class:`~chronos_jupyter.provisioner.ChronosProvisioner` (config section of that name)."""

    memory = Union(
        [Unicode(), Int(), Float()], default_value="", config=True,
        help="GPU memory per device for each kernel's lease: 8G, 512M, 50%, or a bare fraction (0.5). Required.",
    )
    duration = Union(
        [Unicode(), Int(), Float()], default_value="1h", config=True,
        help="How long each kernel's lease lasts: 2h, 90m, 1h30m or seconds.",
    )
    gpus = Int(None, allow_none=True, config=True, help="Number of devices granted together.")
    device = Union(
        [Int(), List(Int()), Unicode()], default_value=None, allow_none=True, config=True,
        help="Which device index(es) to use (all or none); default: the least loaded that fits.",
    )
    priority = Enum(
        Priority.choices(), default_value=None, allow_none=True, config=True,
        help="Queue priority (default: the system config's default_priority).",
    )
    # ``wait`` is a method of every provisioner, so the trait has another name; kernel.json's
    # config key stays ``wait`` (mapped in __init__).
    queue_wait = Union(
        [Bool(), Unicode(), Float()], default_value=False, config=True,
        help="When no capacity is free: false fails the start at once; true waits in the queue; "
        "a duration (10m) waits at most that long. kernel.json spells it \"wait\".",
    )
    on_expiry = Enum(
        Action.choices(), default_value=None, allow_none=True, config=True,
        help="What happens when the lease ends: warn (log only), interrupt (SIGINT, kernel kept), "
        "terminate (SIGTERM, then SIGKILL after the shutdown wait), kill (SIGKILL). Auto-restart is "
        "stopped for terminate and kill. Default: on_expiry in /etc/chronos/config.toml [defaults] "
        "(terminate).",
    )
    on_overuse = Enum(
        Action.choices(), default_value="terminate", config=True,
        help="What the watchdog does when the kernel's processes use more GPU memory than the lease "
        "past its grace period (same choices as on_expiry). A terminated kernel is auto-restarted "
        "within the rest of its lease's time.",
    )
    idle_after = Union(
        [Unicode(), Int(), Float()], default_value="", config=True,
        help="This kernelspec's own idle rule: act on a kernel whose lease used no GPU time this long (30m). "
        "It adds to the system's [limits] idle_after, never lifts it. Empty: the system's rule only.",
    )
    on_idle = Enum(
        OnIdle.choices(), default_value=None, allow_none=True, config=True,
        help="What this kernelspec's idle rule does: warn, release (the kernel keeps running without a lease) "
        "or terminate (the kernel is stopped). Default release.",
    )
    warn_before = Union(
        [Unicode(), Int(), Float()], default_value="10m", config=True,
        help="Warn in the notebook (IPython kernels) and the log this long before the lease ends, and a minute before.",
    )
    check_interval = Float(
        1.0, config=True, help="Seconds between the watchdog's checks of the kernel's GPU memory and lease "
        "(0.05 to 60)."
    )

    def __init__(self, **kwargs: Any) -> None:
        if "wait" in kwargs:
            kwargs["queue_wait"] = kwargs.pop("wait")
        super().__init__(**kwargs)
