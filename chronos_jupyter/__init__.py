"""Chronos for Jupyter: ``%chronos`` magics, a lease widget and a kernel provisioner.

Load the magics with ``%load_ext chronos_jupyter`` (or list ``chronos_jupyter`` in
``c.InteractiveShellApp.extensions``). Importing this package stays light: IPython and
ipywidgets are imported only when the extension loads, so the kernel provisioner can
import ``chronos_jupyter.provisioner`` without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import chronos
    from chronos_jupyter.magics import ChronosMagics

__all__ = ["current_lease", "load_ipython_extension", "unload_ipython_extension"]

_magics: ChronosMagics | None = None


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%chronos`` and ``%%chronos`` with this IPython shell."""
    global _magics
    from chronos_jupyter.magics import ChronosMagics

    _magics = ChronosMagics(ipython)
    ipython.register_magics(_magics)


def unload_ipython_extension(ipython: Any) -> None:
    """Stop the widget and watchdog threads; a held lease stays until released or the kernel exits."""
    global _magics
    if _magics is None:
        return
    _magics.shutdown()
    magics_manager = ipython.magics_manager
    for kind in ("line", "cell"):
        magics_manager.magics[kind].pop("chronos", None)
    _magics = None


def current_lease() -> chronos.Lease | None:
    """The lease ``%chronos reserve`` took in this kernel (or the kernel's own lease), if any."""
    if _magics is None:
        return None
    return _magics.current()
