"""Sites that fail: each keeps the run going with the others, is charged in full for what
it was asked to do, and shows in metrics.jsonl (through the real ServerApp and ClientApp
on the in-process LocalGrid)."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import ConfigRecord, Error, Message, RecordDict

from experiments.local_grid import LocalGrid, run_federation, run_keeping_checkpoint
from fed_dplora.run.checkpoint import Checkpoint
from fed_dplora.run.results import read_metrics
from strategies import wire as p
from strategies.lora_fedavg import LoraFedAvg
from strategies.screening import Accepted, Screened
from strategies.wire import to_arrays, to_record

NODES = 3
BAD = 101  # the failing node: site "partition-1"


def _with_arrays(reply: Message, change) -> Message:
    arrays = to_arrays(reply.content[p.ARRAYS])
    change(arrays)
    content = RecordDict({p.ARRAYS: to_record(arrays), p.METRICS: reply.content[p.METRICS],
                          p.CONFIG: reply.content[p.CONFIG]})
    return Message(content, reply_to=_request(reply))


def _request(reply: Message) -> Message:
    """A stand-in for the message `reply` answers (Message(reply_to=...) needs one)."""
    request = Message(RecordDict(), dst_node_id=reply.metadata.src_node_id,
                      message_type=reply.metadata.message_type)
    request.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    return request


def nan_tensor(kind, reply):
    if kind != "train":
        return reply
    return _with_arrays(reply, lambda a: next(iter(a.values())).__setitem__((0, 0), np.nan))


def wrong_shape(kind, reply):
    if kind != "train":
        return reply
    def change(arrays):
        name = next(iter(arrays))
        arrays[name] = np.zeros((1, 1), np.float32)
    return _with_arrays(reply, change)


def foreign_a(kind, reply):
    if kind != "train":
        return reply
    content = RecordDict({p.ARRAYS: reply.content[p.ARRAYS],
                          p.METRICS: reply.content[p.METRICS],
                          p.CONFIG: ConfigRecord({p.A_FINGERPRINT: "f" * 64})})
    return Message(content, reply_to=_request(reply))


def error_on(message_type: str, reason: str):
    """A tamper hook: the node answers `message_type` messages with an error."""
    def tamper(kind, reply):
        if kind != message_type:
            return reply
        return Message(Error(0, reason), reply_to=_request(reply))
    return tamper


def run(config: dict, grid: LocalGrid) -> tuple[list[dict], dict, Path]:
    run_federation(config, NODES, grid)
    folder = Path(config["output-dir"]) / config["run-name"]
    return (read_metrics(folder), json.loads((folder / "privacy_report.json").read_text()),
            folder)


def steps_charged(folder: Path) -> dict[str, int]:
    counts = Checkpoint.load(folder).ledgers["sample"]["counts"]
    return {site: sum(row[-1] for row in rows) for site, rows in counts.items()}


@pytest.fixture()
def failing(config):
    config.update({"clients-per-round": NODES, "min-replies": 2, "num-server-rounds": 2,
                   "max-site-failures": 100})
    return config


@pytest.mark.parametrize("how, reason", [
    ("crash", "simulated client crash"),
    ("silent", "no reply before the round timeout"),
    ("nan", "holds NaN or Inf"),
    ("shape", "shape (1, 1)"),
    ("foreign-a", "different LoRA A"),
])
def test_a_failing_site_costs_its_round_not_the_run(failing, how, reason):
    grid = LocalGrid(failing, NODES)
    if how == "crash":
        grid.failing.add(BAD)
    elif how == "silent":
        grid.silent.add(BAD)
        failing["round-timeout"] = 1
    else:
        grid.tamper[BAD] = {"nan": nan_tensor, "shape": wrong_shape,
                            "foreign-a": foreign_a}[how]
    rows, report, folder = run(failing, grid)
    assert [r["round"] for r in rows] == [1, 2] and report["stopped"] is None
    for row in rows:
        assert not row["lost"] and row["replies"] == 2
        assert list(row["failures"]["train"]) == ["partition-1"]
        assert reason in row["failures"]["train"]["partition-1"]
        assert row["eval_accuracy"] is not None
    # Nothing invalid was averaged in, and the failed site is charged like the others.
    assert all(np.isfinite(a).all() for a in Checkpoint.load(folder).arrays.values())
    assert steps_charged(folder) == {f"partition-{i}": 2 * 2 for i in range(NODES)}
    eps = report["sample"]["epsilon_rdp"]
    assert eps["partition-1"] == eps["partition-0"] > 0


def test_a_site_that_fails_to_evaluate_is_left_out_of_the_metrics(failing):
    grid = LocalGrid(failing, NODES)
    grid.tamper[BAD] = error_on("evaluate", "disk full")
    rows, _, _ = run(failing, grid)
    for row in rows:
        assert row["failures"]["train"] == {}
        assert "disk full" in row["failures"]["evaluate"]["partition-1"]
        assert row["eval_accuracy"] is not None


def test_rounds_below_min_replies_are_lost_charged_and_stop_the_run(config):
    config.update({"clients-per-round": NODES, "num-server-rounds": 5,
                   "max-lost-rounds": 2})  # min-replies "all": every site must answer
    grid = LocalGrid(config, NODES)
    grid.failing.add(BAD)
    rows, report, folder = run(config, grid)
    assert [(r["round"], r["lost"], r["eval_accuracy"]) for r in rows] == [
        (1, True, None), (2, True, None)]
    assert report["stopped"].startswith("failures: 2 rounds in a row")
    assert report["rounds_lost_to_failures"] == 2  # which rounds: the checkpoint and log
    assert Checkpoint.load(folder).failed_rounds == [1, 2]
    # Lost rounds are charged: every site was asked, and may have released.
    assert steps_charged(folder) == {f"partition-{i}": 2 * 2 for i in range(NODES)}
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((folder / "summary.json").read_text())["stopped"] == report["stopped"]


def test_a_site_that_keeps_failing_is_no_longer_asked(failing):
    failing.update({"max-site-failures": 2, "num-server-rounds": 3})
    grid = LocalGrid(failing, NODES)
    grid.failing.add(BAD)
    rows, _, folder = run(failing, grid)
    # Round 1: its train and evaluate failed (2 in a row), so rounds 2-3 skip it.
    assert [r["clients"] for r in rows] == [
        ["partition-0", "partition-1", "partition-2"],
        ["partition-0", "partition-2"], ["partition-0", "partition-2"]]
    assert steps_charged(folder)["partition-1"] == 2


def test_resume_goes_on_without_a_departed_site_and_refuses_a_changed_one(
        config, monkeypatch):
    config.update({"clients-per-round": 2, "min-replies": 2, "num-server-rounds": 3})
    after_round_1 = run_keeping_checkpoint(
        config, monkeypatch, lambda c: c.round == 1 and c.pending is None, NODES)
    folder = Path(config["output-dir"]) / "run"
    after_round_1.save(folder)  # what a crash after round 1 leaves
    (folder / "summary.json").unlink()
    resumed = {**config, "resume": True}

    changed = LocalGrid(resumed, NODES)
    def bigger(kind, reply):
        if kind != "query":
            return reply
        fields = dict(reply.content[p.CONFIG])
        fields[p.NUM_TRAIN_EXAMPLES] += 1
        return Message(RecordDict({p.CONFIG: ConfigRecord(fields)}), reply_to=_request(reply))
    changed.tamper[BAD] = bigger
    with pytest.raises(RuntimeError, match=r"\['partition-1'\] now hold a different number"):
        run_federation(resumed, NODES, changed)

    two_left = LocalGrid(resumed, NODES, [{"partition-id": i, "num-partitions": NODES}
                                          for i in (0, 2)])
    run_federation(resumed, NODES, two_left)
    rows = read_metrics(folder)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[1]["clients"] == rows[2]["clients"] == ["partition-0", "partition-2"]
    assert json.loads((folder / "summary.json").read_text())["rounds_completed"] == 3


def test_a_reply_reporting_other_noise_than_planned_stops_the_run(config):
    """Fail closed for privacy: the ledger cannot charge a mechanism it did not plan."""
    grid = LocalGrid(config, NODES)
    def less_noise(kind, reply):
        if kind != "train":
            return reply
        metrics = reply.content[p.METRICS]
        metrics[p.NOISE_MULTIPLIER] = metrics[p.NOISE_MULTIPLIER] / 2
        return reply
    for node in (100, 101, 102):
        grid.tamper[node] = less_noise
    with pytest.raises(RuntimeError, match="refusing an update the ledger cannot account"):
        run_federation(config, NODES, grid)


def test_dp_accounting_agrees_with_the_charge_of_a_failed_site(failing):
    grid = LocalGrid(failing, NODES)
    grid.failing.add(BAD)
    _, report, _ = run(failing, grid)
    sample = report["sample"]
    q = sample["sampling_probability"]["partition-1"]
    sigma = sample["noise_multiplier"]["partition-1"]
    accountant = rdp.RdpAccountant()
    accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), 2 * 2)
    assert sample["epsilon_rdp"]["partition-1"] == pytest.approx(
        accountant.get_epsilon(sample["delta"]), rel=0.01)


def test_a_site_that_fails_the_census_is_left_out_of_the_run(config):
    grid = LocalGrid(config, NODES)
    grid.tamper[BAD] = error_on("query", "no data mounted")
    rows, report, _ = run(config, grid)
    assert sorted(report["sample"]["epsilon_rdp"]) == ["partition-0", "partition-2"]
    assert all(r["clients"] == ["partition-0", "partition-2"] for r in rows)
    assert all(r["failures"] == {"train": {}, "declined": {}, "evaluate": {}} for r in rows)


def test_a_round_every_asked_site_declined_is_lost_but_one_that_asked_nobody_is_not():
    strategy = LoraFedAvg()
    declined = {1: "WorkStopped: ...", 2: "SiteDeclines: ..."}
    assert strategy.is_lost(Screened([1, 2], {}, {}, declined))
    assert not strategy.is_lost(Screened([1, 2], {1: Accepted({"b": np.zeros(1)}, {})}, {},
                                         {2: declined[2]}))
    assert not strategy.is_lost(Screened([], {}, {}, {}))  # Poisson sampling chose nobody
