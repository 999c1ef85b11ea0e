"""Per-record test predictions (experiments.predictions): rebuilt from a finished run
folder, written only when they reproduce the run's final federated accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.local_grid import run_federation
from experiments.predictions import (PREDICTIONS, PredictionMismatch, predictions_by_site,
                                     save_predictions, texts_digest)
from fed_dplora.config import parse_run_config
from fed_dplora.data.site import SitePlacement, load_site
from fed_dplora.run.results import read_metrics

NODES = 3


@pytest.fixture()
def config(tiny_bert, tmp_path) -> dict:
    return {"model.name": tiny_bert, "output-dir": str(tmp_path / "runs"), "run-name": "ffa",
            "num-server-rounds": 3, "clients-per-round": NODES, "local-steps": 4,
            "batch-size": 32, "physical-batch-size": 32, "learning-rate": 0.05,
            "optimizer": "adam", "privacy.level": "none", "data.demo-records-per-site": 150}


def test_predictions_reproduce_the_final_accuracy_and_pair_arms_by_record(config):
    run_federation(config, NODES)
    run_federation({**config, "run-name": "vanilla", "method": "vanilla"}, NODES)
    runs = Path(config["output-dir"])
    saved = {arm: json.loads(save_predictions(runs / arm).read_text())
             for arm in ("ffa", "vanilla")}
    spec = parse_run_config(config)
    for arm, file in saved.items():
        assert file["accuracy"] == pytest.approx(
            read_metrics(runs / arm)[-1]["eval_accuracy"], abs=1e-9)
        assert sorted(file["sites"]) == [f"partition-{i}" for i in range(NODES)]
        for i in range(NODES):  # each site's own test records, in the site's order
            site, test = file["sites"][f"partition-{i}"], load_site(
                spec, SitePlacement(i, NODES)).test
            assert site["records_sha256"] == texts_digest(test.texts)
            assert len(site["labels"]) == len(site["predicted"]) == len(test.texts)
    # One seed, two methods: the same records and labels, so a per-record pairing holds.
    # (Whether the tiny random model predicts more than one class depends on its random
    # init; the test below checks that predictions that do not reproduce the run's
    # accuracy are refused.)
    ffa, vanilla = saved["ffa"]["sites"], saved["vanilla"]["sites"]
    assert all(ffa[s]["records_sha256"] == vanilla[s]["records_sha256"]
               and ffa[s]["labels"] == vanilla[s]["labels"] for s in ffa)


def test_predictions_that_do_not_reproduce_the_run_are_not_written(config):
    run_federation({**config, "num-server-rounds": 1}, NODES)
    run = Path(config["output-dir"]) / "ffa"
    rows = (run / "metrics.jsonl").read_text().splitlines()
    last = json.loads(rows[-1])
    last["eval_accuracy"] = round(1 - last["eval_accuracy"], 6) or 0.5  # another run's score
    (run / "metrics.jsonl").write_text("\n".join(rows[:-1] + [json.dumps(last)]) + "\n")
    with pytest.raises(PredictionMismatch, match="not saved"):
        save_predictions(run)
    assert not (run / PREDICTIONS).exists()
    assert not list(run.glob(f".{PREDICTIONS}*"))


def test_a_deployed_sites_predictions_are_not_rebuilt(config):
    run_federation({**config, "num-server-rounds": 1}, NODES)
    run = Path(config["output-dir"]) / "ffa"
    plan = json.loads((run / "privacy_plan.json").read_text())
    plan["client_sizes"] = {"hospital-a": 100}
    (run / "privacy_plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="'hospital-a'.*partition-0"):
        predictions_by_site(run)
