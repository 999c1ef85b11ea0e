"""The one-run audit's epsilon lower bound (Steinke et al. 2023), checked independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from experiments.audit_one_run import (
    GUESSES, NO_DP, RUNS, Setting, audit, epsilon_lower_bound, highest_bound,
    nominal_epsilon, p_value, prepare, run_summaries, settings)


def test_with_delta_zero_the_bound_is_where_the_binomial_tail_meets_alpha():
    m, r, v, alpha = 1000, 200, 150, 0.05
    tail = lambda eps: stats.binom.sf(v - 1, r, 1 / (1 + math.exp(-eps))) - alpha  # noqa: E731
    assert epsilon_lower_bound(m, r, v, 0.0, alpha) == pytest.approx(
        optimize.brentq(tail, 0.0, 10.0), abs=1e-6)
    assert p_value(m, r, v, 1.0, 0.0) == pytest.approx(
        stats.binom.sf(v - 1, r, 1 / (1 + math.exp(-1.0))))


def test_the_delta_term_only_loosens_and_chance_guessing_bounds_nothing():
    assert p_value(1000, 200, 150, 1.0, 1e-5) > p_value(1000, 200, 150, 1.0, 0.0)
    assert epsilon_lower_bound(1000, 200, 150, 1e-5, 0.05) < epsilon_lower_bound(
        1000, 200, 150, 0.0, 0.05)
    assert epsilon_lower_bound(1000, 200, 100, 1e-5, 0.05) == 0.0
    assert epsilon_lower_bound(1000, 200, 190, 1e-5, 0.05) > epsilon_lower_bound(
        1000, 200, 170, 1e-5, 0.05)


def test_the_bound_exceeds_the_true_epsilon_in_at_most_5_percent_of_runs():
    """Randomized response at a known epsilon: the best possible auditor's guesses are
    right with probability e^eps / (1 + e^eps), independently."""
    rng = np.random.default_rng(0)
    true_eps, over = 2.0, 0
    for _ in range(300):
        correct = int((rng.random(100) < 1 / (1 + math.exp(-true_eps))).sum())
        over += epsilon_lower_bound(100, 100, correct, 0.0, 0.05) > true_eps
    assert over <= 0.05 * 300 + 2 * math.sqrt(300 * 0.05 * 0.95)


def test_the_audit_finds_a_clear_signal_and_none_in_noise():
    rng = np.random.default_rng(1)
    included = rng.random(500) < 0.5
    separated = np.where(included, 0.1, 2.0) + rng.normal(0, 0.01, 500)
    assert audit(separated, included, 1e-5)["epsilon_lower_bound"] > 2.0
    assert audit(rng.normal(size=500), included, 1e-5)["epsilon_lower_bound"] < 0.5


def test_the_no_leak_p_value_is_the_bonferroni_adjusted_fair_coin_tail():
    """With delta 0, "no leak" means each guess is a fair coin: the p-value is the
    smallest over k of the binomial tail at 1/2, times the number of k tried."""
    rng = np.random.default_rng(2)
    included = rng.random(1000) < 0.5
    losses = np.where(included, 0.0, 1.0) + rng.normal(0, 6.0, 1000)  # a weak signal
    order = np.argsort(losses, kind="mergesort")
    tails = [stats.binom.sf(included[order[:k]].sum() + (~included[order[-k:]]).sum() - 1,
                            2 * k, 0.5) for k in GUESSES]
    result = audit(losses, included, 0.0)
    assert result["p_no_leak"] == pytest.approx(min(1.0, len(GUESSES) * min(tails)),
                                                rel=1e-9, abs=0)
    assert result["p_no_leak"] < 0.05 and result["epsilon_lower_bound"] > 0
    chance = audit(rng.normal(size=1000), included, 0.0)
    assert chance["p_no_leak"] > 0.05 and chance["epsilon_lower_bound"] == 0  # agree


def test_1000_canaries_cannot_bound_more_than_about_5_3():
    """Every guess right at k = 500 is the most a run can show: the bound docs/privacy.md
    quotes, and it is what a perfect separation of 1,000 canaries gives."""
    assert highest_bound(1000, 1e-5) == pytest.approx(5.3, abs=0.05)
    included = np.arange(1000) % 2 == 0
    assert audit(np.where(included, 0.0, 1.0), included, 1e-5)[
        "epsilon_lower_bound"] == pytest.approx(highest_bound(1000, 1e-5))
    assert highest_bound(100, 1e-5) < highest_bound(1000, 1e-5)


def test_each_run_is_summarised_over_seeds_against_its_nominal_epsilon():
    control = Setting("sample", 1e12, "sgd", 0.1, 0.1)
    assert nominal_epsilon(control) == 1.0  # held against the eps-1 run it scales
    assert nominal_epsilon(Setting("sample", 8.0, "sgd", 0.1)) == 8.0
    rows = [{"run": "sample-sigma-x0.1", "epsilon_lower_bound": bound,
             "nominal_epsilon": 1.0} for bound in (0.0, 0.6, 1.4)] + [
        {"run": "none", "epsilon_lower_bound": 1.2, "nominal_epsilon": None}]
    assert run_summaries(rows) == [
        "- sample-sigma-x0.1: bounds 0.00, 0.60, 1.40; above 0 in 2 of 3 seeds, above "
        "ε = 1 in 1 of 3.", "- none: bounds 1.20; above 0 in 1 of 1 seeds."]


def test_exactly_the_included_canaries_are_trained_on(tmp_path):
    """The audit is valid only if an "out" canary never reaches training (and no canary
    reaches the test split): each canary is in train.tsv exactly when it is included."""
    rows = [(f"clean text number {i} about topic {i % 4}", f"topic{i % 4}") for i in range(200)]
    source = tmp_path / "dev.tsv"
    source.write_text("".join(f"{t}\t{y}\n" for t, y in rows))
    folder, canary, included = prepare(tmp_path / "work", 300, 100, 0, 4, source)
    train = (folder / "train.tsv").read_text().splitlines()[1:]
    test = (folder / "test.tsv").read_text().splitlines()[1:]
    texts = [line.rsplit("\t", 1)[0] for line in train]
    for text, label, inside in zip(canary.texts, canary.labels, included):
        assert (f"{text}\t{label}" in texts) == inside
        assert all(not line.startswith(text) for line in test)
    assert len(train) == 100 + included.sum() and 100 < included.sum() < 200
    assert set(canary.labels) <= {f"topic{i}" for i in range(4)}
    assert len(set(canary.texts)) == 300  # distinct canaries


def test_canaries_leave_every_clean_records_site_where_it_was(tmp_path):
    """The audited mechanism is the one epsilon covers: with or without canaries, each
    clean record trains at the same site."""
    rows = [(f"clean text number {i} about topic {i % 4}", f"topic{i % 4}") for i in range(200)]
    source = tmp_path / "dev.tsv"
    source.write_text("".join(f"{t}\t{y}\n" for t, y in rows))
    sites = {}
    for count in (0, 300):
        folder, _, _ = prepare(tmp_path / f"work-{count}", count, 100, 0, 4, source)
        lines = (folder / "train.tsv").read_text().splitlines()[1:]
        sites[count] = {line.rsplit("\t", 1)[0]: line.rsplit("\t", 1)[1] for line in lines
                        if line.startswith("clean")}
    assert sites[0] == sites[300] and len(sites[0]) == 100
    assert len(set(sites[0].values())) == 4


def test_the_named_runs_are_audited_in_order_with_the_dp_learning_rate():
    assert settings(["eps1", "none"], 0.1) == [NO_DP, Setting("sample", 1.0, "sgd", 0.1)]
    runs = settings(list(RUNS), 0.3)
    assert [s.epsilon for s in runs[:3]] == [None, 8.0, 1.0]
    # The positive controls: the same DP pipeline (SGD at the DP rate), less noise.
    assert [(s.level, s.optimizer, s.learning_rate, s.noise_scale) for s in runs[3:]] == [
        ("sample", "sgd", 0.3, 0.1), ("sample", "sgd", 0.3, 0.001)]
