"""Chronos for Jupyter: ``%chronos`` magics, a lease widget and a kernel provisioner."""
