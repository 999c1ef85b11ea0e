"""The sweep/report pipeline on a 2x2 grid of real `flwr run` jobs with a tiny model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from experiments.flwr_job import LocalFederation
from experiments.report import COLUMNS, plots, report
from experiments.sweep import SweepError, cell_folder, cells, run_sweep
from fed_dplora.config import parse_run_config
from fed_dplora.data.site import SitePlacement, load_site
from fed_dplora.run.results import read_metrics

pytestmark = pytest.mark.e2e


def write_sweep(path, tiny_bert, output, grid='method = ["ffa", "vanilla"]\nprivacy = ["none", 8.0]'):
    path.write_text(f'''name = "tiny"
output = "{output}"
clients = 2

[base]
"model.name" = "{tiny_bert}"
num-server-rounds = 2
clients-per-round = 2
local-steps = 2
batch-size = 32
physical-batch-size = 16
learning-rate = 0.5
"data.demo-records-per-site" = 150

[grid]
{grid}
''')
    return path


def test_sweep_runs_each_cell_once_and_the_report_writes_tables_and_plots(
        tiny_bert, tmp_path, monkeypatch):
    config = write_sweep(tmp_path / "tiny.toml", tiny_bert, tmp_path / "sweep")
    out = run_sweep(config)
    folders = sorted(p.name for p in (out / "cells").iterdir())
    assert folders == ["method=ffa__privacy=8.0", "method=ffa__privacy=none",
                       "method=vanilla__privacy=8.0", "method=vanilla__privacy=none"]
    # Every cell saved its per-record test predictions, checked against its final score.
    for folder in (out / "cells").iterdir():
        saved = json.loads((folder / "predictions.json").read_text())
        assert saved["accuracy"] == pytest.approx(read_metrics(folder)[-1]["eval_accuracy"])

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell ran again")
    monkeypatch.setattr(LocalFederation, "run", refuse)
    run_sweep(config)  # resumed: every cell is finished, nothing runs

    result = report(out)
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == COLUMNS and len(rows) == 4
    private = [r for r in rows if r["privacy"] != "none"]
    assert len(private) == 2 and all(0 < float(r["epsilon_sample"]) <= 8.0 for r in private)
    assert all(0 <= float(r["final_macro_f1"]) <= 1 for r in rows)
    assert "± " not in (out / "results.md").read_text()  # one seed: no std
    # The demo's pooled test set (2 sites x 30 records) by hand: its majority label.
    spec = parse_run_config({"data.demo-records-per-site": 150})
    test = [y for site in range(2) for y in load_site(spec, SitePlacement(site, 2)).test.labels]
    majority = max(test.count(y) for y in set(test)) / len(test)
    assert all(float(r["majority_accuracy"]) == pytest.approx(majority) for r in rows)
    assert majority < 1
    names = sorted(p.name for p in result["plots"])
    # One rank: no rank plot. One ε: no privacy-utility curve (see the test below).
    assert names == ["accuracy_vs_round_synthetic-triage.png",
                     "aggregation_error_synthetic-triage.png"]
    for plot in result["plots"]:
        data = plot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    # A tuned folder's results.md is experiments.tuning's: the report must not replace it.
    (out / "tuning.md").write_text("tuned\n")
    (out / "results.md").write_text("chosen settings\n")
    assert report(out)["table"] == out / "cells.md"
    assert (out / "results.md").read_text() == "chosen settings\n"
    assert "± " not in (out / "cells.md").read_text() and "ffa" in (out / "cells.md").read_text()


def _row(method, epsilon, rank=8, seed=0):
    return {"dataset": "d", "method": method, "rank": rank, "learning_rate": 1.0,
            "partition": "iid", "seed": seed, "target_epsilon": epsilon,
            "privacy": "none" if epsilon is None else f"sample:{epsilon:g}",
            "epsilon_sample": epsilon, "final_accuracy": 0.6 + 0.01 * seed,
            "majority_accuracy": 0.5, "_curve": [0.55, 0.6], "_agg_error": [0.5, 0.4]}


@pytest.mark.parametrize("epsilons, ranks, expected", [
    ([None, 8.0], [8], ["round", "aggregation_error"]),
    ([None, 8.0, 1.0], [8], ["round", "epsilon", "aggregation_error"]),
    ([8.0, 1.0], [8, 16], ["round", "epsilon", "rank", "aggregation_error"]),
])
def test_curves_need_two_points(epsilons, ranks, expected, tmp_path):
    rows = [_row(m, e, k, s) for m in ("ffa", "vanilla") for e in epsilons for k in ranks
            for s in (0, 1)]
    written = plots(rows, tmp_path)
    names = {"round": "accuracy_vs_round_d.png", "epsilon": "accuracy_vs_epsilon_d.png",
             "rank": "accuracy_vs_rank_d.png", "aggregation_error": "aggregation_error_d.png"}
    assert [p.name for p in written] == [names[k] for k in
                                         ("round", "epsilon", "rank", "aggregation_error")
                                         if k in expected]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_bad_sweep_files_name_the_problem(tiny_bert, tmp_path):
    bad = write_sweep(tmp_path / "bad.toml", tiny_bert, tmp_path / "s",
                      grid='partition = ["zipf:2"]')
    with pytest.raises(SweepError, match="partition='zipf:2'.*dirichlet:0.5"):
        run_sweep(bad, dry_run=True)
    bad = write_sweep(tmp_path / "bad2.toml", tiny_bert, tmp_path / "s",
                      grid='method = ["ffa", "fedprox"]')
    with pytest.raises(SweepError, match="cell method=fedprox: method='fedprox'"):
        run_sweep(bad, dry_run=True)


@pytest.mark.parametrize("config", sorted(
    (Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.toml")),
    ids=lambda p: p.stem)
def test_committed_sweep_configs_expand_to_valid_cells(config):
    run_sweep(config, dry_run=True)  # every cell's run config parses; nothing runs


def test_a_cell_run_under_its_methods_earlier_name_is_found_not_rerun(tmp_path):
    """The methods study ran Frozen-AB-R as "fed-sb": a follow-up naming "frozen-ab-r"
    finds those folders, and its run config uses the current name."""
    study = {"name": "s", "clients": 2, "base": {"num-server-rounds": 1},
             "grid": {"method": ["frozen-ab-r", "ffa"], "seed": [0]}}
    renamed, ffa = cells(study, tmp_path)
    (tmp_path / "method=fed-sb__seed=0").mkdir()
    assert renamed.run_config["method"] == "frozen-ab-r"
    assert cell_folder(tmp_path, renamed) == tmp_path / "method=fed-sb__seed=0"
    assert cell_folder(tmp_path, ffa) == tmp_path / "method=ffa__seed=0"
    (tmp_path / "method=frozen-ab-r__seed=0").mkdir()  # its own folder, once it has one
    assert cell_folder(tmp_path, renamed) == tmp_path / "method=frozen-ab-r__seed=0"
    written = {**study, "grid": {"method": ["fed-sb"], "seed": [0]}}
    (old,) = cells(written, tmp_path)
    assert old.name == "method=fed-sb__seed=0" and old.run_config["method"] == "frozen-ab-r"
