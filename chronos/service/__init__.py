"""The Chronos service: one process owns the ledger; clients reach it over a Unix socket."""
