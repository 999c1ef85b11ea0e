"""A hostile (or careless) coordinator against the real ClientApp, in process: each
attack on a site's guarantee is refused or charged, and no record text, label set
beyond the declared one, or participation signal reaches the coordinator.

The attacks through an app bundle (code the coordinator ships) run against a real
SuperNode in test_site_runner.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import Crash, crash_at, deployed_nodes, write_site_csv

from experiments.local_grid import LocalGrid, run_federation
from fed_dplora.config import ConfigError
from fed_dplora.data.site import MAX_SHARED_LABELS
from fed_dplora.run.checkpoint import Checkpoint
from fed_dplora.run.results import read_metrics
from fed_dplora.site.ledger import SiteLedger, SiteLimits
from strategies import wire as p
from strategies.screening import ClientFailure

NODES = 3


def folder_of(config) -> Path:
    return Path(config["output-dir"]) / config["run-name"]


def report_of(config) -> dict:
    return json.loads((folder_of(config) / "privacy_report.json").read_text())


def recording(grid: LocalGrid) -> list:
    """Every reply the coordinator receives (errors too), as (node, message type, reply)."""
    seen, send_and_receive = [], grid.send_and_receive

    def recorded(messages, *, timeout=None):
        messages = list(messages)
        replies = list(send_and_receive(messages, timeout=timeout))
        kinds = {m.metadata.message_id: (m.metadata.dst_node_id, m.metadata.message_type)
                 for m in messages}
        seen.extend((*kinds[r.metadata.reply_to_message_id], r) for r in replies)
        return replies
    grid.send_and_receive = recorded
    return seen


def reply_text(reply) -> str:
    """Everything a reply carries besides tensors, as text."""
    if reply.has_error():
        return reply.error.reason
    content = reply.content
    return json.dumps({**{k: dict(v) for k, v in content.config_records.items()},
                       **{k: dict(v) for k, v in content.metric_records.items()}},
                      default=str)


def test_a_run_config_naming_the_text_column_as_labels_sends_no_record(config, tmp_path):
    """Simulation: the census declines a label column that does not look like labels."""
    data = write_site_csv(tmp_path / "notes.csv", 0, 300)
    config.update({"data.path": str(data), "data.label-column": "text"})
    grid = LocalGrid(config, NODES)
    seen = recording(grid)
    with pytest.raises(ClientFailure, match="census: no site answered") as failure:
        run_federation(config, NODES, grid)
    texts = [line.split(",")[0] for line in data.read_text().splitlines()[1:]]
    leaked = [t for t in texts if any(t in reply_text(r) for _, _, r in seen)
              or t in str(failure.value)]
    assert seen and not leaked
    assert "LabelsWithheld" in str(failure.value)


def test_a_deployed_site_reads_the_columns_it_declared_whatever_the_run_config_says(
        config, tmp_path):
    config.update({"data.label-column": "text", "data.text-column": "label"})
    grid = LocalGrid(config, NODES, deployed_nodes(tmp_path, NODES, config["model.name"]),
                     deployment=True)
    seen = recording(grid)
    run_federation(config, NODES, grid)
    saved = json.loads((folder_of(config) / "config.json").read_text())
    assert saved["label_names"] == ["emergency", "routine", "urgent"]
    census = [r for _, kind, r in seen if kind == "query"]
    assert len(census) == NODES
    # dp-only (a deployment's default): which labels its training split holds stays home.
    assert all(p.TRAIN_LABEL_NAMES not in r.content[p.CONFIG] for r in census)


def test_labels_outside_the_declared_set_are_not_sent(config, tmp_path):
    nodes = deployed_nodes(tmp_path, NODES, config["model.name"],
                           labels="routine,urgent")  # not "emergency"
    nodes[0]["labels"] = "emergency,routine,urgent"
    grid = LocalGrid(config, NODES, nodes, deployment=True)
    seen = recording(grid)
    config["clients-per-round"] = 1
    run_federation(config, NODES, grid)
    errors = [r.error.reason for _, kind, r in seen if kind == "query" and r.has_error()]
    assert len(errors) == 2 and all("LabelsWithheld" in e for e in errors)
    assert all("emergency" not in e for e in errors)
    assert json.loads((folder_of(config) / "config.json").read_text())["label_names"] == [
        "emergency", "routine", "urgent"]


LABEL_LIKE = {  # a column the run config names as labels, 300 records a site
    "ids": lambda i: f"MRN{i:05d}",  # short, but one per record: more than any label set
    "notes": lambda i: f"Jane Roe {i % 3} was admitted on 1961-03-02 with chest pain"}


@pytest.mark.parametrize("kind", sorted(LABEL_LIKE))
def test_a_label_column_of_ids_or_long_notes_is_withheld_at_the_census(config, tmp_path,
                                                                       kind):
    """Simulation, where the census reads a site's label values from its data: a column
    of more than MAX_SHARED_LABELS values, or of values longer than a label, is withheld
    whole and named by no value. Mutants killed: the census's count check, or its length
    check, removed."""
    data = write_site_csv(tmp_path / "notes.csv", 0, 300 * NODES)
    lines = data.read_text().splitlines()
    values = [LABEL_LIKE[kind](i) for i in range(len(lines) - 1)]
    data.write_text("\n".join([lines[0] + ",tag", *(f"{line},{value}" for line, value
                                                    in zip(lines[1:], values))]) + "\n")
    config.update({"data.path": str(data), "data.label-column": "tag"})
    grid = LocalGrid(config, NODES)
    seen = recording(grid)
    with pytest.raises(ClientFailure, match="census: no site answered") as failure:
        run_federation(config, NODES, grid)
    assert "LabelsWithheld" in str(failure.value)
    told = [reply_text(r) for _, _, r in seen] + [str(failure.value)]
    assert seen and not [v for v in values if any(v in text for text in told)]


def test_a_deployed_supernode_without_a_data_path_is_never_trained(config, tmp_path):
    config["data.path"] = str(write_site_csv(tmp_path / "coordinator.csv", 0))
    nodes = [{"site-id": f"s{i}", "share-metrics": "all"} for i in range(NODES)]
    with pytest.raises(ClientFailure, match="no data-path"):
        run_federation(config, NODES, LocalGrid(config, NODES, nodes, deployment=True))
    assert not (folder_of(config) / "metrics.jsonl").exists()


def test_runs_with_other_seeds_caps_fractions_and_columns_charge_one_account(
        config, tmp_path):
    """Budget reset: each run's training split and run-config columns differ, the
    account does not, and it declines at its limit. Mutants killed: the account keyed
    also by the run's seed, its record cap, or its label column."""
    ledger_files = [tmp_path / f"ledger-{i}.json" for i in range(NODES)]

    def run(name: str, run_id: int, limit: float | None = None, **overrides) -> dict:
        cfg = {**config, "run-name": name, "clients-per-round": NODES,
               "num-server-rounds": 2, "privacy.noise-multiplier": 1.0,
               "privacy.target-epsilon": 100.0, **overrides}
        nodes = deployed_nodes(tmp_path, NODES, config["model.name"], **{"share-metrics": "all"})
        for node, ledger in zip(nodes, ledger_files):
            node["privacy-ledger"] = str(ledger)
            if limit is not None:
                node["max-epsilon"] = limit
        run_federation(cfg, NODES, LocalGrid(cfg, NODES, nodes, deployment=True,
                                             run_id=run_id))
        return cfg

    run("seed-0", 1)
    run("seed-1", 2, seed=1, **{"data.max-records": 100, "data.validation-fraction": 0.2,
                                "data.label-column": "text", "data.text-column": "label"})
    accounts = SiteLedger(ledger_files[0], SiteLimits()).accounts()
    assert len(accounts) == 1 and len(next(iter(accounts.values()))["runs"]) == 2
    spent = SiteLedger(ledger_files[0], SiteLimits()).spend(next(iter(accounts.values())))
    third = run("seed-2", 3, limit=spent.replace_one + 0.01, seed=2)
    assert "max-epsilon" in report_of(third)["declined_sites"]["partition-0"]
    assert len(SiteLedger(ledger_files[0], SiteLimits()).accounts()) == 1


@pytest.mark.parametrize("level", ["none", "client"])
def test_a_deployed_site_declines_rounds_without_sample_level_noise(config, tmp_path, level):
    """Declined for that reason (shown: these sites share their reasons), before any
    epsilon limit: infinity would pass one too. Mutant killed: the un-noised check."""
    config.update({"privacy.level": level, "privacy.secure-noise": True,
                   "privacy.client-noise-multiplier": 1.0})
    nodes = deployed_nodes(tmp_path, NODES, config["model.name"], **{"share-metrics": "all"})
    grid = LocalGrid(config, NODES, nodes, deployment=True)
    seen = recording(grid)
    run_federation(config, NODES, grid)
    train = [r for _, kind, r in seen if kind == "train"]
    assert 1 <= len(train) <= NODES  # each asked at most once: it declined, is not asked again
    assert all("without sample-level DP noise" in r.content[p.CONFIG][p.DECLINED]
               and not r.content.array_records for r in train)


def test_a_site_that_opts_into_unnoised_rounds_is_charged_infinity_and_listed_void(
        config, tmp_path):
    """Consent is allow-unnoised and no finite epsilon limit (a deployed site's
    defaults are finite, and infinity passes any of them). Client-level DP only: each
    site's ledger charges infinity and the report lists every site as void. Mutants
    killed: an un-noised round charged nothing; the void list left to opted-out sites."""
    config.update({"privacy.level": "client", "privacy.secure-noise": True,
                   "privacy.client-sampling": "fixed", "privacy.client-noise-multiplier": 1.0,
                   "privacy.client-target-epsilon": 100.0, "num-server-rounds": 1})
    nodes = deployed_nodes(tmp_path, NODES, config["model.name"], **{
        "allow-unnoised": True, "max-epsilon": float("inf"), "max-run-epsilon": float("inf")})
    run_federation(config, NODES, LocalGrid(config, NODES, nodes, deployment=True))
    assert len(read_metrics(folder_of(config))) == 1
    ledger = SiteLedger(Path(tmp_path / "flwr-home" / "fed-dplora" / "site-ledger.json"),
                        SiteLimits())
    spends = [ledger.spend(a).replace_one for a in ledger.accounts().values()]
    assert sorted(spends)[-2:] == [float("inf")] * 2  # the two sites asked to train
    report = report_of(config)
    assert report["epsilon_void_sites"] == [f"partition-{i}" for i in range(NODES)]
    assert "no sample-level noise" in report["epsilon_void_note"]


def test_no_sample_level_noise_lists_every_site_as_void(config):
    config.update({"privacy.level": "client", "privacy.client-noise-multiplier": 1.0,
                   "num-server-rounds": 1})
    run_federation(config, NODES)
    report = report_of(config)
    assert report["epsilon_void_sites"] == [f"partition-{i}" for i in range(NODES)]
    assert "no sample-level noise" in report["epsilon_void_note"]


def test_seeded_client_level_dp_is_refused_outside_the_simulation(config, tmp_path):
    config.update({"privacy.level": "client", "privacy.secure-noise": False})
    grid = LocalGrid(config, NODES, deployed_nodes(tmp_path, NODES, config["model.name"]),
                     deployment=True)
    with pytest.raises(ConfigError, match="secure-noise=false.*no client-level guarantee"):
        run_federation(config, NODES, grid)
    run_federation(config, NODES)  # a simulation may seed it (reproducible research)


def test_with_secret_sampling_no_shared_file_tells_who_trained_or_how_often(config):
    config.update({"privacy.level": "both", "privacy.secure-noise": True,
                   "clients-per-round": 1, "num-server-rounds": 3,
                   "privacy.client-noise-multiplier": 1.0, "privacy.noise-multiplier": 1.0,
                   "privacy.target-epsilon": 100.0})
    run_federation(config, NODES)
    folder = folder_of(config)
    rows = read_metrics(folder)
    timing = {"train_s", "evaluate_s", "started_at", "wall_s"}
    assert rows and all(not timing & set(r) and "clients" not in r for r in rows)
    report = report_of(config)
    per_site = report["sample"]["epsilon_rdp"]
    assert len(set(per_site.values())) == 1  # each as if drawn every round
    assert "secret sampling" in report["sample"]["bound_note"]
    assert all(len(events) == 1 and events[0]["count"] == 2 * 3
               for events in report["sample"]["events"].values())
    assert isinstance(report["declined_sites"], str)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["epsilon_sample"] == report["sample"]["epsilon_rdp_max"]
    # The final checkpoint too (mutant killed: `publishable_state` returning the run's
    # own state, whose sample ledger counts each site's actual rounds).
    saved = Checkpoint.load(folder)
    counts = saved.ledgers["sample"]["counts"]
    assert len(counts) == NODES and all(
        [n for _, n in rows] == [2 * 3] for rows in counts.values())
    assert not (saved.declined or saved.excluded or saved.failure_streaks or saved.pending)


def test_a_dp_only_site_says_only_that_it_declines(config, tmp_path):
    config.update({"privacy.noise-multiplier": 1.0, "privacy.secure-noise": False})
    nodes = deployed_nodes(tmp_path, NODES, config["model.name"], **{"min-noise-multiplier": 2.0,
                                               "max-epsilon": 3.0})
    run_federation(config, NODES, LocalGrid(config, NODES, nodes, deployment=True))
    report = report_of(config)
    assert set(report["declined_sites"].values()) == {p.DECLINED_WITHHELD}
    shared = (folder_of(config) / "metrics.jsonl").read_text() + json.dumps(report)
    assert "min-noise" not in shared and "max-epsilon" not in shared


def test_a_seeded_replay_asks_the_sites_the_crashed_attempt_would_have_asked(
        config, monkeypatch):
    """A site excluded for failing stays excluded after a crash and resume."""
    config.update({"clients-per-round": 1, "num-server-rounds": 5, "min-replies": 1,
                   "max-site-failures": 1, "max-lost-rounds": 5})

    def grid_with_a_failing_site(cfg):
        grid = LocalGrid(cfg, NODES)
        grid.failing = {100}
        return grid
    whole = {**config, "run-name": "whole"}
    run_federation(whole, NODES, grid_with_a_failing_site(whole))
    crash_at(monkeypatch, "_charge", 4)
    with pytest.raises(Crash):
        run_federation(config, NODES, grid_with_a_failing_site(config))
    monkeypatch.undo()
    resumed = {**config, "resume": True}
    run_federation(resumed, NODES, grid_with_a_failing_site(resumed))
    asked = [r["clients"] for r in read_metrics(folder_of(config))]
    assert asked == [r["clients"] for r in read_metrics(folder_of(whole))]
    # It failed round 0's evaluation and was excluded before round 1 (the resumed run
    # would ask it again if the checkpoint did not keep the exclusion).
    assert all("partition-0" not in sites for sites in asked)
