"""``chronos doctor [--json]``: what Chronos can see and enforce here."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "doctor", help="show what Chronos can see and enforce on this machine",
        description="Report the GPU backend, driver, devices, state directory, MPS, cgroup limits and "
        "the GPU frameworks found, and which enforcement tiers work here. Exits 1 when a problem "
        "needs attention.",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=doctor)


def doctor(args: argparse.Namespace) -> int:
    from chronos.api import default_engine
    from chronos.cli import render
    from chronos.doctor import diagnose

    report = diagnose(default_engine())
    if args.json:
        render.dump_json(report.to_dict())
        return 1 if report.problems else 0
    kind = "simulated" if report.simulated else "real" if report.backend else "none"
    print(f"backend:      {report.backend or '-'} ({kind})")
    cuda = f" (CUDA {report.cuda_driver})" if report.cuda_driver else ""
    print(f"driver:       {report.driver or '-'}{cuda}")
    for d in report.devices:
        print(f"GPU {d['index']}:        {d['name']}  {d['uuid']}  "
              f"{render.gib(d['memory_used_bytes'])} used of {render.gib(d['memory_total_bytes'])}")
    sd = report.state_dir
    if sd:
        extra = f"mode {sd['mode']}, owner uid {sd['owner_uid']}" if sd.get("exists") else sd.get("note", "")
        print(f"state dir:    {sd['path']} ({extra})")
    mps = report.mps
    running = "daemon running" if mps.get("active") else "no daemon"
    print(f"MPS:          {running} (pipe dir {mps.get('pipe_dir')})")
    for note in mps.get("notes", []):
        print(f"              {note}")
    fw = ", ".join(f"{k} {v}" for k, v in report.frameworks.items() if v) or "none found"
    print(f"frameworks:   {fw}")
    print("enforcement:")
    for tier, state in report.enforcement.items():
        print(f"  {tier + ':':22}{state}")
    for problem in report.problems:
        render.warn(problem)
    return 1 if report.problems else 0
