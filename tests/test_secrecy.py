"""What the coordinator cannot waive or hide: secret sampling, fresh randomness decided
by each site, and a charge for every release whatever crashes when."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dp_accounting as dpa
import pytest
from dp_accounting import rdp
from helpers import Crash, crash_at, deployed_nodes

from experiments.local_grid import LocalGrid, run_federation
from fed_dplora.run.checkpoint import Checkpoint
from fed_dplora.run.results import read_metrics
from server.reporting import PARTICIPATION_FIELDS

REPO = Path(__file__).resolve().parents[1]
NODES = 3
REPLACE_ONE = dpa.privacy_accountant.NeighboringRelation.REPLACE_ONE


def report_of(config) -> dict:
    folder = Path(config["output-dir"]) / config["run-name"]
    return json.loads((folder / "privacy_report.json").read_text())


def test_with_secret_sampling_the_shared_metrics_show_no_participation(config):
    config["privacy.secure-noise"] = True
    run_federation(config, NODES)
    rows = read_metrics(Path(config["output-dir"]) / "run")
    assert len(rows) == 3
    assert all(not set(PARTICIPATION_FIELDS) & set(r) for r in rows)
    assert all(r["eval_accuracy"] is not None for r in rows)
    assert "sampling_note" not in report_of(config)


def test_a_seeded_simulation_says_what_its_sampling_assumes(config):
    run_federation(config, NODES)
    rows, report = read_metrics(Path(config["output-dir"]) / "run"), report_of(config)
    assert all(len(r["clients"]) == 2 for r in rows)  # a simulation may show them
    assert "participants are secret" in report["sampling_note"]
    assert set(report["randomness"].values()) == {"seeded"}


def test_a_deployed_site_draws_fresh_randomness_whatever_the_server_asks(config, tmp_path):
    """The server asks for seeded noise; outside the simulation every client refuses,
    except one that opted out itself: its epsilon is reported void."""
    nodes = deployed_nodes(tmp_path, NODES, config["model.name"])
    nodes[2]["secure-noise"] = False
    run_federation(config, NODES, LocalGrid(config, NODES, nodes, deployment=True))
    report = report_of(config)
    assert report["secure_noise"] is False  # what the (simulated) server asked
    assert report["randomness"] == {"partition-0": "fresh", "partition-1": "fresh",
                                    "partition-2": "seeded-by-site"}
    assert report["epsilon_void_sites"] == ["partition-2"]
    # A deployed site keeps its own ledger by default, under FLWR_HOME.
    default = Path(os.environ["FLWR_HOME"]) / "fed-dplora" / "site-ledger.json"
    assert len(json.loads(default.read_text())["accounts"]) == NODES  # one per data file


def test_a_simulated_site_keeps_no_ledger_unless_asked(config):
    run_federation(config, NODES)
    assert not (Path(os.environ["FLWR_HOME"]) / "fed-dplora").exists()


def test_flowers_simulation_is_detected_in_process_and_nothing_else_is():
    code = "from clients.runtime import in_simulation; print(in_simulation())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout.strip()
    assert out == "False"  # e2e: a real `flwr run` simulation reports "seeded" sites


# Where the server dies in round 2, and whether the new aggregate had left it by then.
CRASHES = [("_charge", False),  # the train replies arrived; nothing aggregated yet
           ("_mark_released", False),  # aggregated, not yet broadcast
           ("_evaluate", True)]  # broadcast for evaluation


@pytest.mark.parametrize("method, released", CRASHES)
@pytest.mark.parametrize("fresh_sites", [["partition-0", "partition-1", "partition-2"],
                                         ["partition-1"]], ids=["secure", "one-site-fresh"])
def test_every_release_is_charged_whatever_crashes_when(config, monkeypatch, method,
                                                        released, fresh_sites):
    secure = len(fresh_sites) == NODES
    config.update({"privacy.level": "both", "privacy.client-sampling": "fixed",
                   "clients-per-round": NODES, "num-server-rounds": 3,
                   "privacy.secure-noise": secure, "privacy.noise-multiplier": 1.0,
                   "privacy.client-noise-multiplier": 2.0, "privacy.target-epsilon": 80.0,
                   "privacy.client-target-epsilon": 80.0})
    nodes = [{"partition-id": i, "num-partitions": NODES,
              "secure-noise": f"partition-{i}" in fresh_sites} for i in range(NODES)]
    crash_at(monkeypatch, method, 2)
    with pytest.raises(Crash):
        run_federation(config, NODES, LocalGrid(config, NODES, nodes))
    monkeypatch.undo()
    run_federation({**config, "resume": True}, NODES,
                   LocalGrid({**config, "resume": True}, NODES, nodes))
    report = report_of(config)
    assert report["lost_rounds"] == [2]
    # Independent count: 3 committed rounds of 2 steps for every site, plus the lost
    # round's steps for each site that drew fresh randomness; client level: 3 rounds,
    # plus the lost round's if its aggregate was broadcast.
    sample, client = report["sample"], report["client"]
    for site, eps in sample["epsilon_rdp"].items():
        steps = 2 * (3 + (site in fresh_sites))
        accountant = rdp.RdpAccountant()
        accountant.compose(dpa.PoissonSampledDpEvent(
            sample["sampling_probability"][site],
            dpa.GaussianDpEvent(sample["noise_multiplier"][site])), steps)
        assert eps == pytest.approx(accountant.get_epsilon(sample["delta"]), rel=0.01), site
    accountant = rdp.RdpAccountant(neighboring_relation=REPLACE_ONE)
    accountant.compose(dpa.SampledWithoutReplacementDpEvent(
        NODES, NODES, dpa.GaussianDpEvent(2.0 / 2)), 3 + released)
    assert client["epsilon_rdp_max"] == pytest.approx(accountant.get_epsilon(
        client["delta"]), rel=0.01)
    assert Checkpoint.load(Path(config["output-dir"]) / "run").round == 3


def test_a_deployed_site_shares_only_what_the_accountant_needs_unless_it_opts_in(
        config, tmp_path):
    nodes = deployed_nodes(tmp_path, NODES, config["model.name"])
    nodes[1]["share-metrics"] = "evaluation"
    grid = LocalGrid(config, NODES, nodes, deployment=True)
    sent = []  # (node, message type, metric names) of every reply

    def record(node):
        def keep(kind, reply):
            sent.append((node, kind, sorted(reply.content.metric_records.get("metrics", {}))))
            return reply
        return keep
    grid.tamper = {node: record(node) for node in (100, 101, 102)}
    run_federation(config, NODES, grid)
    train = {tuple(names) for _, kind, names in sent if kind == "train"}
    assert train == {("noise-multiplier", "num-examples", "sampling-probability", "steps")}
    assert {node for node, kind, _ in sent if kind == "evaluate"} == {101}  # opted in
    rows = read_metrics(Path(config["output-dir"]) / "run")
    assert all(r["train_loss"] is None and r["eval_accuracy"] is not None for r in rows)


@pytest.mark.parametrize("mode, leaks", [("all", True), ("dp-only", False)])
def test_an_error_leaves_a_site_as_its_type_alone_unless_it_shares_all(
        config, monkeypatch, tmp_path, mode, leaks):
    import clients.local_site

    def broken(*args):
        raise ValueError("record 17 reads 'Jane Roe, 1961-03-02'")
    monkeypatch.setattr(clients.local_site, "prepare", broken)
    config.update({"min-replies": 1, "max-lost-rounds": 1})
    nodes = deployed_nodes(tmp_path, NODES, config["model.name"], **{"share-metrics": mode})
    run_federation(config, NODES, LocalGrid(config, NODES, nodes, deployment=True))
    (row,) = read_metrics(Path(config["output-dir"]) / "run")
    reasons = " ".join(row["failures"]["train"].values())
    assert ("Jane Roe" in reasons) == leaks
    assert "ValueError" in reasons
