"""experiments.compare_methods: methods side by side at their validation choices."""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import pytest
from scipy import stats
from test_tuning import _preregister, fake_cell

from experiments import compare_methods, tuning

REPO = Path(__file__).resolve().parents[1]


def _study(tmp_path):
    study, regime = tmp_path / "methods", tmp_path / "regime"
    for seed, ffa, sb, sa in [(0, 0.80, 0.83, 0.70), (1, 0.82, 0.86, 0.71),
                              (2, 0.81, 0.85, 0.72)]:
        fake_cell(regime, f"ffa{seed}", "ffa", 1.0, 0.1, "sgd", seed, val=0.8, test=ffa,
                  bytes_up=600)
        fake_cell(study, f"sb{seed}", "frozen-ab-r", 1.0, 0.1, "sgd", seed, val=0.8, test=sb,
                  bytes_up=20)
        fake_cell(study, f"sa{seed}", "fedsa", 1.0, 0.1, "sgd", seed, val=0.8,
                  test=sa + 0.1, personal=sa + 0.2, bytes_up=300)
    # a worse seed-0 candidate on validation, better on test: never chosen
    fake_cell(study, "sb-other", "frozen-ab-r", 1.0, 0.3, "sgd", 0, val=0.7, test=0.99)
    # the baseline study ran a seed this study did not register: left out of every row
    fake_cell(regime, "ffa3", "ffa", 1.0, 0.1, "sgd", 3, val=0.8, test=0.99, bytes_up=600)
    _preregister(study, [{"id": "M1", "claim": "c", "difference": "frozen-ab-r - ffa",
                          "at": {"privacy": "1.0", "partition": "iid"}}],
                 {"../regime": ["ffa"]}, seeds=(0, 1, 2))
    return study


def test_each_method_is_scored_at_its_choice_and_paired_with_ffa_by_seed(tmp_path):
    study = _study(tmp_path)
    rows = compare_methods.family_rows(study)
    table = compare_methods.comparison(rows, tuning.choose(rows), {"frozen-ab-r", "fedsa"})
    (sb,) = [line for line in table.splitlines() if line.startswith("| frozen-ab-r |")]
    gaps = [0.03, 0.04, 0.04]  # by hand, seed by seed
    half = 100 * stats.t.ppf(0.975, 2) * statistics.stdev(gaps) / 3 ** 0.5
    assert f"| +{100 * statistics.fmean(gaps):.2f} ± {half:.2f} (n=3) |" in sb
    assert "| sgd 0.1 | 0, 1, 2 | 0.8467 ± " in sb and "| 0.0 | 0.0 |" in sb  # 20 B
    # FedSA's test row scores its shared model (B = 0), and its label says so
    (sa,) = [line for line in table.splitlines()
             if line.startswith("| fedsa shared (B = 0) |")]
    assert "| 0.9100 ± " in sa and "not shown" in sa  # personal; +0.00 ± 0.02 vs FFA
    assert table.index("| ffa |") < table.index("| frozen-ab-r |")  # the registry's order
    (ffa,) = [line for line in table.splitlines() if line.startswith("| ffa |")]
    assert "| sgd 0.1 | 0, 1, 2 | 0.8100 ± " in ffa  # seed 3 (0.99) not registered


def test_the_figure_plots_each_method_at_its_upload_bytes_with_its_interval(tmp_path):
    study = _study(tmp_path)
    rows = compare_methods.family_rows(study)
    points = compare_methods.figure_points(rows, tuning.choose(rows), {"frozen-ab-r", "fedsa"})
    half = lambda v: stats.t.ppf(0.975, 2) * statistics.stdev(v) / 3 ** 0.5  # noqa: E731
    expected = [("iid", "1.0", "ffa", 600, 0.81, half([0.80, 0.82, 0.81])),
                ("iid", "1.0", "frozen-ab-r", 20, 0.8467, half([0.83, 0.86, 0.85])),
                ("iid", "1.0", "fedsa", 300, 0.81, half([0.80, 0.81, 0.82]))]
    assert [p[:4] for p in points] == [e[:4] for e in expected]
    for point, (*_, mean, width) in zip(points, expected):
        assert point[4:6] == pytest.approx((mean, width), abs=1e-4) and point[6] == 3
    path = compare_methods.figure(points, study / compare_methods.FIGURE)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_the_methods_studys_committed_comparison_reproduces_from_its_cells(
        tmp_path, monkeypatch):
    """comparison.md, rebuilt from the committed cells of the methods study and its
    baseline study (which has run more seeds since), is the committed one."""
    results = REPO / "experiments" / "results"
    for study in ("cpu_agnews_methods", "cpu_agnews_regime"):
        shutil.copytree(results / study, tmp_path / study)
    (tmp_path / "cpu_agnews_methods" / compare_methods.COMPARISON).unlink()
    study = tmp_path / "cpu_agnews_methods"
    monkeypatch.setattr("sys.argv", ["compare_methods", str(study)])
    compare_methods.main()
    committed = results / "cpu_agnews_methods" / compare_methods.COMPARISON
    assert (study / compare_methods.COMPARISON).read_text() == committed.read_text()
