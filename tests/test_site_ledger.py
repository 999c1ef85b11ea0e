"""A site's own ledger: it persists across runs, composes them, declines what would pass
its limits, and agrees with the server's ledger and with dp-accounting."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import dp_accounting as dpa
import pytest
from dp_accounting import rdp

from fed_dplora.site_ledger import (TOTAL, RoundAsk, SiteDeclines, SiteLedger, SiteLimits,
                                    dataset_key)
from local_grid import LocalGrid, run_federation

NODES = 3
Q, SIGMA, DELTA = 32 / 120, 1.0, 1e-5  # 150 demo records a site, 80% train


def dp_accounting_epsilon(steps: int, q: float = Q, sigma: float = SIGMA) -> float:
    accountant = rdp.RdpAccountant()
    accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(DELTA)


def site_config(config, tmp_path, run: str) -> dict:
    return {**config, "run-name": run, "clients-per-round": NODES, "num-server-rounds": 3,
            "privacy.noise-multiplier": SIGMA, "privacy.delta": DELTA,
            "privacy.target-epsilon": 100.0}


def nodes(tmp_path, **limits) -> list[dict]:
    return [{"partition-id": i, "num-partitions": NODES,
             "privacy-ledger": str(tmp_path / f"site-{i}.json"), "max-delta": DELTA,
             **limits} for i in range(NODES)]


def test_two_runs_compose_at_the_site_and_the_second_is_declined_at_its_budget(
        config, tmp_path):
    # Run 1 takes 3 rounds x 2 steps; run 2 fits one more round (8 steps), not two.
    limit = (dp_accounting_epsilon(8) + dp_accounting_epsilon(10)) / 2
    sites = nodes(tmp_path, **{"max-epsilon": limit})
    first = site_config(config, tmp_path, "first")
    run_federation(first, NODES, LocalGrid(first, NODES, sites, run_id=1))
    server = json.loads((Path(first["output-dir"]) / "first" / "privacy_report.json")
                        .read_text())["sample"]["epsilon_rdp"]
    ledger = SiteLedger(tmp_path / "site-0.json", SiteLimits(limit, DELTA))
    (dataset,) = ledger.datasets()
    assert ledger.spend(dataset)[TOTAL] == pytest.approx(server["partition-0"], rel=0.01)
    assert ledger.spend(dataset)[TOTAL] == pytest.approx(dp_accounting_epsilon(6), rel=0.01)

    second = site_config(config, tmp_path, "second")
    run_federation(second, NODES, LocalGrid(second, NODES, sites, run_id=2))
    folder = Path(second["output-dir"]) / "second"
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((folder / "privacy_report.json").read_text())
    assert not rows[0]["failures"]["declined"] and sorted(rows[1]["failures"]["declined"]) == [
        f"partition-{i}" for i in range(NODES)]
    assert "max-epsilon" in report["declined_sites"]["partition-0"]
    assert report["stopped"].startswith("failures: no site is left")
    spend = ledger.spend(dataset)
    assert spend["1"] == pytest.approx(dp_accounting_epsilon(6), rel=0.01)
    assert spend["2"] == pytest.approx(dp_accounting_epsilon(2), rel=0.01)
    assert spend[TOTAL] == pytest.approx(dp_accounting_epsilon(8), rel=0.01)
    assert spend[TOTAL] <= limit
    # The server charged run 2 only the round that trained (the decline released nothing).
    assert report["sample"]["epsilon_rdp"]["partition-0"] == pytest.approx(
        dp_accounting_epsilon(2), rel=0.01)


def test_a_server_asking_for_less_noise_than_the_site_allows_is_refused(config, tmp_path):
    run = site_config(config, tmp_path, "run")
    run_federation(run, NODES, LocalGrid(run, NODES, nodes(
        tmp_path, **{"min-noise-multiplier": 2 * SIGMA})))
    report = json.loads((Path(run["output-dir"]) / "run" / "privacy_report.json")
                        .read_text())
    assert all("min-noise-multiplier 2" in why for why in report["declined_sites"].values())
    assert len(report["declined_sites"]) == NODES
    assert report["sample"]["epsilon_rdp_max"] == 0.0  # nothing trained, nothing charged
    assert not (tmp_path / "site-0.json").exists() or not any(
        SiteLedger(tmp_path / "site-0.json", SiteLimits()).datasets().values())


def _charge_many(path: str, times: int) -> None:
    ledger = SiteLedger(path, SiteLimits())
    for _ in range(times):
        ledger.charge_or_decline("data", RoundAsk("run", Q, SIGMA, 1))


def test_concurrent_client_apps_never_lose_a_charge(tmp_path):
    path = str(tmp_path / "ledger.json")
    workers = [multiprocessing.Process(target=_charge_many, args=(path, 25))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    ((_, steps),) = json.loads(Path(path).read_text())["data"]["run"].items()
    assert steps == 100


def test_limits_are_checked_before_anything_is_charged(tmp_path):
    ledger = SiteLedger(tmp_path / "l.json", SiteLimits(max_epsilon=1.0, max_delta=DELTA))
    with pytest.raises(SiteDeclines, match="without DP noise"):
        ledger.charge_or_decline("d", RoundAsk("r", Q, None, 2))
    with pytest.raises(SiteDeclines, match="max-epsilon 1"):
        ledger.charge_or_decline("d", RoundAsk("r", Q, SIGMA, 1000))
    assert ledger.spend("d") == {TOTAL: 0.0}
    assert dataset_key(("a", "b"), ("0", "1")) != dataset_key(("a", "b"), ("1", "0"))


def test_show_prints_each_run_and_the_total_with_its_pld_bound(tmp_path):
    ledger = SiteLedger(tmp_path / "l.json", SiteLimits(max_delta=DELTA))
    ledger.charge_or_decline("d" * 64, RoundAsk("7", Q, SIGMA, 20))
    ledger.charge_or_decline("d" * 64, RoundAsk("8", Q, SIGMA, 30))
    out = subprocess.run([sys.executable, "-m", "fed_dplora.site_ledger", "show",
                          str(tmp_path / "l.json"), "--delta", str(DELTA)],
                         capture_output=True, text=True, check=True).stdout
    total_rdp, total_pld = (float(x) for x in
                            out.split("total epsilon ")[1].replace(" (RDP), ", " ")
                            .split(" (PLD)")[0].split())
    assert total_rdp == pytest.approx(dp_accounting_epsilon(50), rel=0.01)
    assert total_pld < total_rdp
    assert f"run 7: {dp_accounting_epsilon(20):.2f}"[:-1] in out
