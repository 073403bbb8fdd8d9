"""Options several commands share, parsed one way (the spellings are :mod:`chronos.request`'s)."""

from __future__ import annotations

import argparse

from chronos.spellings import Priority


def add_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", nargs="?", const="forever", default=None, metavar="TIMEOUT",
                        help="wait in the queue (at most TIMEOUT, e.g. 10m, or forever) instead of failing "
                             "when it does not fit now")


def add_priority(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--priority", choices=Priority.choices(), default=None,
                        help="queue priority (default: the configured default, normally normal)")
