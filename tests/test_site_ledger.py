"""A site's own ledger: it persists across runs, composes them, declines what would pass
its limits (replace-one epsilon), and agrees with the server's ledger and dp-accounting."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import dp_accounting as dpa
import pytest
from dp_accounting import pld, rdp

from clients import runtime
from fed_dplora.data.site import DataSource
from fed_dplora.run.results import read_metrics
from fed_dplora.site.ledger import ROUNDS, RoundAsk, SiteDeclines, SiteLedger, SiteLimits
from experiments.local_grid import LocalGrid, run_federation

NODES = 3
Q, SIGMA, DELTA = 32 / 120, 1.0, 1e-5  # 150 demo records a site, 80% train
SOURCE = DataSource("d" * 64, 150, "notes.csv")
REPLACE_ONE = dpa.privacy_accountant.NeighboringRelation.REPLACE_ONE


def step(q: float = Q, sigma: float = SIGMA) -> dpa.DpEvent:
    return dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))


def dp_accounting_epsilon(steps: int, q: float = Q, sigma: float = SIGMA) -> float:
    """Add/remove, RDP: what the server's ledger reports."""
    accountant = rdp.RdpAccountant()
    accountant.compose(step(q, sigma), steps)
    return accountant.get_epsilon(DELTA)


def replace_one_epsilon(steps: int, q: float = Q, sigma: float = SIGMA) -> float:
    """Replace-one, PLD: the relation a site's limit is stated in (its n is public)."""
    accountant = pld.PLDAccountant(REPLACE_ONE)
    accountant.compose(step(q, sigma), steps)
    return accountant.get_epsilon(DELTA)


def site_config(config, tmp_path, run: str) -> dict:
    return {**config, "run-name": run, "clients-per-round": NODES, "num-server-rounds": 3,
            "privacy.noise-multiplier": SIGMA, "privacy.delta": DELTA,
            "privacy.target-epsilon": 100.0}


def nodes(tmp_path, **limits) -> list[dict]:
    return [{"partition-id": i, "num-partitions": NODES,
             "privacy-ledger": str(tmp_path / f"site-{i}.json"), "max-delta": DELTA,
             **limits} for i in range(NODES)]


def only_account(path: Path) -> dict:
    (account,) = SiteLedger(path, SiteLimits()).accounts().values()
    return account


def test_two_runs_compose_at_the_site_and_the_second_is_declined_at_its_budget(
        config, tmp_path):
    # Run 1 takes 3 rounds x 2 steps; run 2 fits one more round (8 steps), not two.
    limit = (replace_one_epsilon(8) + replace_one_epsilon(10)) / 2
    sites = nodes(tmp_path, **{"max-epsilon": limit})
    first = site_config(config, tmp_path, "first")
    run_federation(first, NODES, LocalGrid(first, NODES, sites, run_id=1))
    server = json.loads((Path(first["output-dir"]) / "first" / "privacy_report.json")
                        .read_text())["sample"]["epsilon_rdp"]
    ledger = SiteLedger(tmp_path / "site-0.json", SiteLimits(limit, DELTA))
    spend = ledger.spend(only_account(tmp_path / "site-0.json"))
    assert spend.add_remove == pytest.approx(server["partition-0"], rel=0.01)
    assert spend.add_remove == pytest.approx(dp_accounting_epsilon(6), rel=0.01)
    assert spend.replace_one == pytest.approx(replace_one_epsilon(6), rel=0.01)
    assert spend.replace_one > spend.add_remove

    second = site_config(config, tmp_path, "second")
    run_federation(second, NODES, LocalGrid(second, NODES, sites, run_id=2))
    folder = Path(second["output-dir"]) / "second"
    rows = read_metrics(folder)
    report = json.loads((folder / "privacy_report.json").read_text())
    assert not rows[0]["failures"]["declined"] and sorted(rows[1]["failures"]["declined"]) == [
        f"partition-{i}" for i in range(NODES)]
    assert "max-epsilon" in report["declined_sites"]["partition-0"]  # share-metrics=all
    assert report["stopped"].startswith("failures: no site is left")
    account = only_account(tmp_path / "site-0.json")
    assert ledger.spend(account, "1").replace_one == pytest.approx(replace_one_epsilon(6),
                                                                   rel=0.01)
    assert ledger.spend(account, "2").add_remove == pytest.approx(dp_accounting_epsilon(2),
                                                                  rel=0.01)
    assert ledger.spend(account).replace_one == pytest.approx(replace_one_epsilon(8), rel=0.01)
    assert ledger.spend(account).replace_one <= limit
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
    assert not (tmp_path / "site-0.json").exists() or not SiteLedger(
        tmp_path / "site-0.json", SiteLimits()).accounts()


def _charge_many(path: str, times: int) -> None:
    ledger = SiteLedger(path, SiteLimits())
    for _ in range(times):
        ledger.charge_or_decline(SOURCE, RoundAsk("run", Q, SIGMA, 1))


def test_concurrent_client_apps_never_lose_a_charge(tmp_path):
    path = str(tmp_path / "ledger.json")
    workers = [multiprocessing.Process(target=_charge_many, args=(path, 10))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    counts = only_account(Path(path))["runs"]["run"]
    assert counts.pop(ROUNDS) == 40  # and each round's one step
    ((_, steps),) = counts.items()
    assert steps == 40


def test_limits_are_checked_before_anything_is_charged(tmp_path):
    ledger = SiteLedger(tmp_path / "l.json", SiteLimits(max_epsilon=1.0, max_delta=DELTA))
    with pytest.raises(SiteDeclines, match="without sample-level DP noise"):
        ledger.charge_or_decline(SOURCE, RoundAsk("r", Q, None, 2))
    with pytest.raises(SiteDeclines, match="max-epsilon 1"):
        ledger.charge_or_decline(SOURCE, RoundAsk("r", Q, SIGMA, 1000))
    assert not ledger.accounts()


def test_an_unnoised_round_is_charged_infinity_only_where_the_site_opts_in(tmp_path):
    strict = SiteLedger(tmp_path / "strict.json", SiteLimits())
    with pytest.raises(SiteDeclines, match="allow-unnoised"):
        strict.charge_or_decline(SOURCE, RoundAsk("r", Q, None, 2))
    opted = SiteLedger(tmp_path / "opted.json", SiteLimits(allow_unnoised=True))
    assert opted.charge_or_decline(SOURCE, RoundAsk("r", Q, SIGMA, 2)).replace_one < 10
    spend = opted.charge_or_decline(SOURCE, RoundAsk("r", Q, None, 2))
    assert spend.replace_one == spend.add_remove == float("inf")
    # From then on a limit declines every round: infinity passes any max-epsilon.
    limited = SiteLedger(tmp_path / "opted.json", SiteLimits(max_epsilon=50.0,
                                                             allow_unnoised=True))
    with pytest.raises(SiteDeclines, match="inf"):
        limited.charge_or_decline(SOURCE, RoundAsk("r2", Q, SIGMA, 1))


@pytest.mark.parametrize("deployed", [False, True],
                         ids=["ledger-default", "deployed-default"])
def test_a_coordinator_asking_for_almost_no_noise_is_declined_by_default_not_a_crash(
        tmp_path, monkeypatch, deployed):
    """A hostile run config with sigma 0.0044 (PLD epsilon once took 23 GB to compute),
    at a site with the ledger's or a deployed node's default limits: below the floor
    it counts as un-noised, declined before any epsilon is computed, charging nothing.
    Mutant killed: un-noised rounds accepted without allow-unnoised."""
    monkeypatch.setattr(runtime, "in_simulation", lambda: False)
    limits = runtime.site_limits({}) if deployed else SiteLimits()
    ledger = SiteLedger(tmp_path / "site.json", limits)
    with pytest.raises(SiteDeclines, match="without sample-level DP noise"):
        ledger.charge_or_decline(SOURCE, RoundAsk("r", Q, 0.0044, 100))
    assert not ledger.accounts()
    assert ledger.charge_or_decline(SOURCE, RoundAsk("r", Q, SIGMA, 1)).replace_one < 10


def test_delta_follows_the_plans_rule_for_the_sources_records(tmp_path):
    small = DataSource("s" * 64, 5000, "big.csv")  # 1 / (10 n) = 2e-5 > 1e-5: capped
    ledger = SiteLedger(tmp_path / "l.json", SiteLimits())
    assert ledger.charge_or_decline(small, RoundAsk("r", Q, SIGMA, 1)).delta == 1e-5
    large = DataSource("l" * 64, 200_000, "huge.csv")  # 1 / (10 n) = 5e-7
    assert ledger.charge_or_decline(large, RoundAsk("r", Q, SIGMA, 1)).delta == 5e-7


def test_show_prints_each_run_and_the_total_in_both_relations(tmp_path):
    ledger = SiteLedger(tmp_path / "l.json", SiteLimits(max_delta=DELTA))
    ledger.charge_or_decline(SOURCE, RoundAsk("7", Q, SIGMA, 20))
    ledger.charge_or_decline(SOURCE, RoundAsk("8", Q, SIGMA, 30))
    out = subprocess.run([sys.executable, "-m", "fed_dplora.site.ledger", "show",
                          str(tmp_path / "l.json")],
                         capture_output=True, text=True, check=True).stdout
    total = out.split("epsilon ")[1]
    replace_one, add_remove = float(total.split()[0]), float(total.split(", ")[1].split()[0])
    assert replace_one == pytest.approx(replace_one_epsilon(50), rel=0.01)
    assert add_remove == pytest.approx(dp_accounting_epsilon(50), rel=0.01)
    assert "notes.csv, 150 records, delta 1e-05" in out
    assert f"run 7: {replace_one_epsilon(20):.2f}"[:-1] in out
