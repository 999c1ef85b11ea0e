"""What the coordinator cannot waive or hide: secret sampling, fresh randomness decided
by each site, and a charge for every release whatever crashes when."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import Message
from helpers import Crash, crash_at, deployed_nodes
from hostile import HostileCoordinator, site  # noqa: F401

from experiments.local_grid import LocalGrid, run_federation
from fed_dplora.dp.engine import PoissonSampling
from fed_dplora.run.checkpoint import Checkpoint
from fed_dplora.run.results import read_metrics
from server.sites import SiteSampler
from strategies import wire as p
from strategies.wire import to_arrays

REPO = Path(__file__).resolve().parents[1]
NODES = 3
REPLACE_ONE = dpa.privacy_accountant.NeighboringRelation.REPLACE_ONE


def report_of(config) -> dict:
    folder = Path(config["output-dir"]) / config["run-name"]
    return json.loads((folder / "privacy_report.json").read_text())


class ReplayingGrid(LocalGrid):
    """Sites train (and are charged, and report) as usual, but each returns the tensors
    it was sent: the model, and so every evaluation, is the same whoever trains."""

    def _reply(self, node: int, message: Message) -> Message:
        reply = super()._reply(node, message)
        if message.metadata.message_type == "train" and reply.has_content():
            reply.content[p.ARRAYS] = message.content[p.ARRAYS]
        return reply


# Differences allowed between two runs: how long the run and its set-up took, its own
# random key, and where it was written.
RUN_OWN = {("summary.json", "wall_s"), ("metrics.jsonl", 0, "census_s"),
           ("metrics.jsonl", 0, "setup_s"), ("config.json", "run_key"),
           ("run_key.json", "run_key"), ("config.json", "output_dir")}


def readable(path: Path):
    """A run file as data: JSON, JSON lines, an npz's arrays (bytes), else its bytes."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".npz":
        with np.load(path) as saved:
            return {name: (saved[name].dtype.str, saved[name].shape, saved[name].tobytes())
                    for name in saved.files}
    return path.read_bytes()


def differences(a, b, where: tuple = ()) -> list[tuple]:
    """Every place (file, key or index...) where two runs' data differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in differences(a.get(k), b.get(k), (*where, k))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, (*where, i))]
    return [] if a == b else [where]


def run_files_by_participants(config: dict, tmp_path: Path, secure: bool) -> list[tuple]:
    """Where the files of two otherwise equal runs differ: sites 0 and 1 train every
    round in one, sites 1 and 2 in the other."""
    files = []
    for name, chosen in (("first", slice(0, 2)), ("last", slice(1, 3))):
        run = {**config, "privacy.secure-noise": secure, "output-dir": str(tmp_path / name)}
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(SiteSampler, "__call__",
                          lambda self, rnd, askable: sorted(askable)[chosen])
            run_federation(run, NODES, ReplayingGrid(run, NODES))
        folder = tmp_path / name / config["run-name"]
        files.append({str(f.relative_to(folder)): readable(f)
                      for f in sorted(folder.rglob("*")) if f.is_file()})
    return [d for d in differences(*files) if d not in RUN_OWN]


@pytest.mark.parametrize("secure", [True, False], ids=["secret", "seeded-control"])
def test_with_secret_sampling_no_run_file_tells_who_trained(config, tmp_path, secure):
    """Two runs alike but for which sites train (the model kept the same): with secret
    sampling every file the run folder holds, the checkpoint and adapter included, is
    the same but for the run's own timings; the seeded control shows the comparison
    sees participation. Mutants killed: the metrics line not scrubbed; site ids left
    out of the participation fields; the final checkpoint keeping each site's own
    ledger; the report giving each site's own epsilon."""
    found = run_files_by_participants(config, tmp_path, secure)
    if secure:
        assert found == []
    else:
        assert any(d[:3] == ("metrics.jsonl", 1, "clients") for d in found), found
        assert any(d[0] == "checkpoint.npz" for d in found), found


def test_a_seeded_simulation_says_what_its_sampling_assumes(config):
    run_federation(config, NODES)
    rows, report = read_metrics(Path(config["output-dir"]) / "run"), report_of(config)
    assert all(len(r["clients"]) == 2 for r in rows)  # a simulation may show them
    assert "participants are secret" in report["sampling_note"]
    assert set(report["randomness"].values()) == {"seeded"}


def test_the_report_says_which_deployed_sites_drew_fresh_randomness(config, tmp_path):
    """The server asks for seeded noise; outside the simulation every client refuses,
    except one that opted out itself: its epsilon is reported void. Mutant killed: the
    report's void list left empty."""
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


def same_round_twice(monkeypatch, config: dict, site: dict, full_batch: bool):
    """The replies and the Poisson draws of one deployed site sent the identical train
    message twice (the server asks for seeded noise each time)."""
    draws, draw = [], PoissonSampling.draw
    monkeypatch.setattr(PoissonSampling, "draw",
                        lambda self: draws.append(draw(self)) or draws[-1])
    site.update({"max-epsilon": 100.0})
    coordinator = HostileCoordinator(monkeypatch, site, {**config, "local-steps": 1})
    records = coordinator.census().content[p.CONFIG][p.NUM_TRAIN_EXAMPLES]
    coordinator.context.run_config["batch-size"] = records if full_batch else 16
    arrays = coordinator.global_arrays()
    replies = [to_arrays(coordinator.train(arrays, 3.0, secure_noise=False).content[p.ARRAYS])
               for _ in range(2)]
    return replies, draws


@pytest.mark.parametrize("own, fresh", [(None, True), (False, False)],
                         ids=["default", "site-opted-out"])
@pytest.mark.parametrize("full_batch", [True, False], ids=["noise", "sampling"])
def test_a_deployed_site_draws_fresh_randomness_whatever_the_server_asks(
        monkeypatch, config, site, own, fresh, full_batch):
    """The server asks for seeded noise, and the same message twice; a deployed site
    draws its noise (every record sampled, so only the noise can differ) and its Poisson
    batches afresh, unless the site itself set `secure-noise=false`: then the replay is
    exact. Mutants killed: deployed rounds planned seeded (`round_plan`'s
    `secure_noise=False`); the noise, or the sampling, drawn seeded by the trainer."""
    if own is not None:
        site["secure-noise"] = own
    (first, second), draws = same_round_twice(monkeypatch, config, site, full_batch)
    differs = any(not np.array_equal(first[name], second[name]) for name in first)
    assert differs == fresh
    assert len(draws) == 2 and (draws[0] != draws[1]) == (fresh and not full_batch)


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


def test_a_dp_only_site_refuses_the_evaluation_a_coordinator_sends_anyway(
        monkeypatch, config, site):
    """The server asks only the sites whose census says they share evaluation; one that
    asks a dp-only site regardless gets a public refusal, no metric. Mutant killed: the
    ClientApp's evaluate without its share-metrics check."""
    coordinator = HostileCoordinator(monkeypatch, site, config)
    reply = coordinator.evaluate(coordinator.global_arrays())
    assert reply.has_error() and "shares no evaluation metrics" in reply.error.reason


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
