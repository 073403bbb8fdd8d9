"""chronos report against a hand computation over the audit log; chronos metrics parsed as Prometheus does."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import chronos
from chronos.api import default_engine, reset_default_engine
from chronos.devices import simulated
from chronos.errors import UnavailableError
from chronos.identity import current_user
from chronos.policy import figures
from tests.conftest import run_cli
from tests.waiting import wait_for

G = 1 << 30


def configure(text: str) -> None:
    Path(os.environ["CHRONOS_CONFIG"]).write_text(text)
    reset_default_engine()


def _history() -> None:
    """Leases of every kind the report counts: plain, a 2-GPU gang, a wait, a refusal, an idle spell, a no-show."""
    configure('[limits]\nidle_after = "1h"\nidle_warning = "1h"\nbooking_grace = "1s"\n')
    plain = chronos.reserve("8G", "1h", bind=False, label="plain")
    default_engine().record_usage(plain.id, 4 * G, 0.25)
    wait_for(lambda: chronos.get_lease(plain.id).idle_warning is not None, what="an idle spell")
    time.sleep(0.5)  # an idle spell long enough to show in hours rounded to six places
    chronos.extend(plain.id, "5m")  # the spell ends
    plain.release()
    chronos.reserve("10G", "1h", gpus=2, bind=False, label="train").release()
    blocker = chronos.reserve("75G", "1h", gpus=2, bind=False)
    with pytest.raises(UnavailableError):
        chronos.reserve("20G", "1h")  # refused: no capacity
    got: list[chronos.Lease] = []
    waiter = threading.Thread(target=lambda: got.append(chronos.reserve("10G", "30m", wait="30s", bind=False)))
    waiter.start()
    wait_for(lambda: chronos.queue(), what="the waiting request")
    blocker.release()
    waiter.join(timeout=30)
    got[0].release()
    booking = chronos.book("8G", "1h", "now")
    wait_for(lambda: chronos.get_lease(booking.id).state == "no-show", timeout=15, what="the no-show")


def _by_hand(since: float, now: float) -> dict[str, float]:
    """The report's total, computed here from the audit log and the lease records alone."""
    engine = default_engine()
    events = engine.events(since=since)
    ends = {"released", "expired", "revoked"}
    out = dict.fromkeys(("leases", "gpu_hours_reserved", "gib_hours_reserved", "gpu_hours_used", "idle_gpu_hours",
                         "waits", "wait_s", "refusals", "no_shows", "bookings"), 0.0)
    for e in events:
        if e.event == "granted":
            mine = [x for x in events if x.lease_id == e.lease_id and x.id > e.id]
            end = next((x.detail["ended_at"] for x in mine if x.event in ends), now)
            gpus = len(e.detail["devices"])
            out["leases"] += 1
            out["gpu_hours_reserved"] += (end - e.at) / 3600 * gpus
            out["gib_hours_reserved"] += (end - e.at) / 3600 * gpus * e.detail["memory_bytes"] / G
            out["wait_s"] += e.detail.get("waited_s", 0.0)
            record = engine.get(e.lease_id)
            out["gpu_hours_used"] += (record.gpu_seconds or 0) / 3600
            for spell in (x for x in mine if x.event == "idle"):
                stop = next((x.at for x in mine if x.event == "active" and x.id > spell.id), end)
                out["idle_gpu_hours"] += (stop - spell.detail["since"]) / 3600 * gpus
        out["waits"] += e.event == "queued"
        out["refusals"] += e.event == "refused"
        out["no_shows"] += e.event == "no-show"
        out["bookings"] += e.event == "booked"
    return out


def test_the_report_equals_a_hand_computation_over_the_audit_log() -> None:
    first = default_engine().events()
    since = (first[-1].at if first else 0.0)
    _history()
    result = run_cli("report", "--since", "1h", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    want = _by_hand(since, report["until"])
    total = report["total"]
    assert total["leases"] == want["leases"] == 4  # plain, gang, blocker, waiter: none for the refusal
    for key in ("gpu_hours_reserved", "gib_hours_reserved", "gpu_hours_used", "idle_gpu_hours", "wait_s"):
        assert total[key] == pytest.approx(want[key], abs=1e-5), key
    assert want["idle_gpu_hours"] > 0 and want["wait_s"] > 0 and want["gpu_hours_used"] > 0
    for key in ("waits", "refusals", "no_shows", "bookings"):
        assert total[key] == want[key] == 1, key
    me = current_user().name
    assert [row["key"] for row in report["rows"]] == [me]
    assert report["rows"][0]["gpu_hours_reserved"] == pytest.approx(total["gpu_hours_reserved"], abs=1e-5)
    assert total["peak_percent"] == pytest.approx(50.0)  # 4 GiB peak on the 8 GiB lease
    # The log is read a page at a time: pages of one, a few, or all lines give the same report, a lease's
    # grant, idle spell and end falling on different pages.
    whole = figures.gather_report(default_engine(), since=since, now=report["until"], page=10**6).to_dict()
    assert whole["total"]["leases"] == 4
    for page in (1, 2, 3, 7):
        assert figures.gather_report(default_engine(), since=since, now=report["until"], page=page).to_dict() == whole

    by_gpu = json.loads(run_cli("report", "--since", "1h", "--by", "gpu", "--json").stdout)
    # Each row is rounded to six places, so the rows' sum may differ from the rounded total in the last place.
    assert sum(r["gpu_hours_reserved"] for r in by_gpu["rows"]) == pytest.approx(total["gpu_hours_reserved"],
                                                                                 abs=1e-5)
    labels = {r["key"]: r for r in json.loads(run_cli("report", "--since", "1h", "--by", "label", "--json").stdout)
              ["rows"]}
    assert labels["train"]["leases"] == 1 and labels["plain"]["idle_gpu_hours"] > 0
    table = list(csv.reader(io.StringIO(run_cli("report", "--since", "1h", "--csv").stdout)))
    assert table[0][:3] == ["user", "leases", "gpu_hours_reserved"] and table[-1][0] == "TOTAL"
    text = run_cli("report", "--since", "1h", "--by", "group")
    assert text.returncode == 0 and "GPU-H IDLE" in text.stdout
    bad = run_cli("report", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "cannot read time" in bad.stderr


def _families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_parse_as_prometheus_text_with_base_units_and_no_pids() -> None:
    configure('[limits]\nidle_after = "1h"\nidle_warning = "0"\n')
    held = chronos.reserve("8G", "1h", bind=os.getpid())
    simulated.set_utilization(held.devices[0], 50)  # this process, the holder, keeps its GPU busy
    gang = chronos.reserve("10G", "1h", gpus=2, bind=False)
    with pytest.raises(UnavailableError):
        chronos.reserve("79G", "1h", gpus=2)
    wait_for(lambda: chronos.get_lease(gang.id).idle_since is not None, what="the idle spell")
    result = run_cli("metrics")
    assert result.returncode == 0, result.stderr
    families = _families(result.stdout)
    for name, kind in (("chronos_gpu_memory_total_bytes", "gauge"), ("chronos_gpu_memory_reserved_bytes", "gauge"),
                       ("chronos_user_idle_bytes", "gauge"), ("chronos_queue_oldest_wait_seconds", "gauge"),
                       ("chronos_refusals", "counter"), ("chronos_leases_granted", "counter")):
        assert families[name].type == kind, name  # type: ignore[attr-defined]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}  # type: ignore[attr-defined]
    uuids = {d.index: d.uuid for d in chronos.gpus()}
    assert samples[("chronos_gpu_memory_total_bytes", (("gpu", "0"), ("uuid", uuids[0])))] == 80 * G
    me = current_user().name
    assert samples[("chronos_user_reserved_bytes", (("user", me),))] == 8 * G + 2 * 10 * G
    assert chronos.get_lease(held.id).idle_since is None
    assert samples[("chronos_user_idle_bytes", (("user", me),))] == 2 * 10 * G  # only the gang is idle
    assert samples[("chronos_user_leases", (("state", "active"), ("user", me)))] == 2
    assert samples[("chronos_refusals_total", (("reason", "memory"),))] == 1
    assert samples[("chronos_leases_granted_total", ())] == 2
    assert samples[("chronos_queue_length", ())] == 0
    assert not any("pid" in dict(labels) for _name, labels in samples)
    simulated.free(held.devices[0])
    for lease in chronos.leases():
        lease.release()


def test_the_textfile_is_written_atomically_and_not_more_often_than_asked(chronos_env: Path) -> None:
    out = chronos_env / "textfile"
    out.mkdir()
    target = out / "chronos.prom"
    configure(f'[metrics]\ntextfile = "{target}"\ninterval = "1h"\n')
    chronos.reserve("8G", "1h", bind=False)
    chronos.leases()  # a read writes it (at most once an interval)
    text = target.read_text()
    assert "chronos_user_reserved_bytes" in text and _families(text)
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    written = target.stat().st_mtime_ns
    chronos.reserve("8G", "1h", bind=False)
    chronos.leases()
    assert target.stat().st_mtime_ns == written  # within the interval: not again
    assert sorted(p.name for p in out.iterdir()) == ["chronos.prom"]  # no temporary file left
    result = run_cli("metrics", "--write")
    assert result.returncode == 0 and str(target) in result.stdout
    assert "chronos_user_leases" in target.read_text()
    unwritable = run_cli("metrics", "--write", "/nonexistent/dir/x.prom")
    assert unwritable.returncode == 2 and "cannot write" in unwritable.stderr


def test_the_grafana_dashboard_queries_only_series_chronos_exports() -> None:
    from tests.conftest import ROOT

    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exported = set(_families(chronos.metrics()))
    names = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names.update(re.findall(r"\bchronos_[a-z_]+\b", target["expr"]))
    assert names
    # Prometheus's parser names a counter's family without its _total suffix
    assert {n.removesuffix("_total") for n in names} <= exported, names


def test_one_engine_shared_by_many_threads_samples_and_writes_its_metrics_safely(chronos_env: Path) -> None:
    """The service runs every operation of one engine in several threads: the utilisation samples and the
    metrics textfile are taken by one thread at a time, and no operation fails for it."""
    from chronos.api import default_engine

    target = chronos_env / "chronos.prom"
    configure(f'[metrics]\ntextfile = "{target}"\ninterval = "1s"\n'
              '[limits]\nidle_after = "1s"\nidle_warning = "1s"\non_idle = "warn"\n')
    engine = default_engine()
    failures: list[BaseException] = []
    stop = time.monotonic() + 3.0

    def work() -> None:
        try:
            while time.monotonic() < stop:
                lease = engine.reserve("4G", "1h", bind=False)
                engine.leases()
                engine.release(lease.id)
        except BaseException as exc:  # handed to the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == [] and not any(t.is_alive() for t in threads)
    assert engine.policies.samples > 0 and _families(target.read_text())
    assert sorted(p.name for p in chronos_env.iterdir() if p.name.startswith(".chronos.prom")) == []
    assert not [x for x in engine.leases() if x.state == "active"]
