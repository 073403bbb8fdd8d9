"""Chronos for Jupyter: ``%chronos`` magics, a lease widget, a kernel provisioner, and the
server and lab extensions that show leases in JupyterLab and Notebook 7.

Load the magics with ``%load_ext chronos_jupyter`` (or list ``chronos_jupyter`` in
``c.InteractiveShellApp.extensions``). Importing this package stays light: IPython and
ipywidgets are imported only when the extension loads, so the kernel provisioner can
import ``chronos_jupyter.provisioner`` without them, and Jupyter Server imports the REST
handlers only when it loads the server extension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import chronos
    from chronos_jupyter.magics import ChronosMagics

__all__ = ["current_lease", "load_ipython_extension", "unload_ipython_extension"]

#: The lab extension's npm name: its prebuilt files are installed in share/jupyter/labextensions/ under it.
LABEXTENSION = "@chronos-gpu/jupyterlab"

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


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """Jupyter Server finds the REST API here (enabled by the jupyter_server_config.d file installed with it)."""
    return [{"module": "chronos_jupyter"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from chronos_jupyter.server import load_jupyter_server_extension

    load_jupyter_server_extension(serverapp)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where the prebuilt lab extension lives in this package (``jupyter labextension develop`` reads it)."""
    return [{"src": "labextension", "dest": LABEXTENSION}]
