"""Options several commands share, parsed one way."""

from __future__ import annotations

import argparse


def add_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", nargs="?", const=True, default=False, metavar="TIMEOUT",
                        help="wait in the queue (at most TIMEOUT) instead of failing when it does not fit now")


def wait_value(value: bool | str) -> bool | float:
    """``--wait`` as the API takes it: False, True (no limit) or a timeout in seconds."""
    from chronos.errors import InvalidRequestError
    from chronos.units import parse_duration

    if value is True or value is False:
        return value
    try:
        return parse_duration(value)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"--wait: {exc}") from None
