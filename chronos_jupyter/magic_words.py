"""The words after ``%chronos reserve`` and ``%%chronos``, read as the CLI reads them: one argparse
that turns a mistake into one UsageError line with the usage to type, and the core's request parser."""

from __future__ import annotations

import argparse
import shlex
from typing import Any, NoReturn

from IPython.core.error import UsageError

from chronos import api
from chronos.errors import ChronosError
from chronos.request import RequestSpec, parse_request
from chronos.text import plain

__all__ = ["RESERVE_USAGE", "request_of", "reserve_parser", "split_words"]

RESERVE_USAGE = (
    "%chronos reserve MEMORY [DURATION] [--gpu I[,I]] [--gpus N] [--prefer I[,I]] "
    "[--priority low|normal|high] [--wait [TIMEOUT]] [--label TEXT]"
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake as one UsageError line with the usage to type."""

    def __init__(self, usage: str, **kwargs: Any) -> None:
        super().__init__(prog="%chronos", usage=usage, add_help=False, allow_abbrev=False, **kwargs)
        self.hint = usage

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{plain(message)}; type: {self.hint}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(plain((message or "").strip()) or f"type: {self.hint}")


def reserve_parser(usage: str = RESERVE_USAGE) -> _Parser:
    parser = _Parser(usage)
    parser.add_argument("memory", nargs="?")
    parser.add_argument("duration", nargs="?")
    parser.add_argument("--gpu", dest="device")
    parser.add_argument("--gpus")
    parser.add_argument("--prefer")
    parser.add_argument("--priority")
    parser.add_argument("--wait", nargs="?", const="forever", default=None)
    parser.add_argument("--label")
    return parser


def split_words(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot read {plain(line[:80])!r} ({exc}); type %chronos help") from None


def request_of(args: argparse.Namespace, usage: str, label: str | None = None) -> RequestSpec:
    """The parsed words as a request, read by the core's one request parser."""
    if args.memory is None:
        raise UsageError(f"say how much GPU memory and for how long, e.g. {usage.split(' MEMORY')[0]} 8G 2h")
    if args.gpus is not None and args.device is not None:
        raise UsageError("give either --gpu I[,I] (which GPUs) or --gpus N (how many), not both")
    try:
        return parse_request(args.memory, args.duration, device=args.device, gpus=args.gpus, prefer=args.prefer,
                             priority=args.priority, wait=args.wait, label=args.label or label,
                             longest=api.default_engine().config.longest_duration_s)
    except ChronosError as exc:
        raise UsageError(f"{plain(exc)}; type: {usage}") from None
