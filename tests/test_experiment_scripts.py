"""Experiment scripts' own code runs (seconds each, tiny models), so a script whose
figures the docs quote cannot break unnoticed."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from experiments import bench_round
from fed_dplora.config import parse_run_config


def test_bench_rounds_in_process_baselines_run_a_round(tiny_bert, tmp_path):
    """Pure compute and the rebuild-every-round pattern (the `flwr run` half is the same
    job runner the sweeps use, tested in test_sweep.py)."""
    args = argparse.Namespace(clients=2, rounds=1, local_steps=1, batch=16, records=60)
    spec = parse_run_config({**bench_round.run_config(args, tmp_path),
                             "model.name": tiny_bert, "physical-batch-size": 16})
    assert bench_round.PureCompute(args, spec).round(0) > 0
    assert bench_round.CommonPattern(args, spec).round(0) > 0


def test_bench_dp_step_measures_a_tiny_models_modes():
    from experiments import bench_dp_step
    args = argparse.Namespace(batch=4, seq=8, steps=1, repeats=1, precision="fp32",
                              memory=False)
    row = bench_dp_step.measure("tiny-bert", "vanilla", torch.device("cpu"), args)
    assert row["hooks_over_plain"] > 0 and row["plain_records_per_s"] > 0
    assert "tiny-bert" in bench_dp_step.format_row(row)


def test_bench_ledger_drives_the_accountant_and_its_report():
    from experiments.bench_ledger import run
    row = run(rounds=3, clients=4, per_round=2, steps=2)
    assert 0 < row["eps_sample_pld"] <= row["eps_sample_rdp"] and row["eps_client_rdp"] > 0


def test_privacy_check_agrees_with_dp_accounting_on_one_case():
    from experiments.privacy_check import client_case, sample_case
    sample = sample_case(0.08, 1.0, 20, 1e-5)
    assert sample["ledger"] == pytest.approx(sample["dp_accounting"], rel=0.01)
    assert sample["pld"] <= sample["ledger"]
    client = client_case("poisson", 10, 3, 1.0, 5, 1e-2)
    assert client["ledger"] == pytest.approx(client["dp_accounting"], rel=0.01)


def test_audit_mias_scores_match_their_closed_forms():
    from experiments.audit_mia import auc, best_threshold_accuracy
    members, non_members = np.array([3.0, 4.0]), np.array([1.0, 2.0, 3.0])
    assert auc(members, non_members) == pytest.approx((3 + 2.5) / 6)  # 1 tie of 6 pairs
    assert auc(non_members, non_members) == 0.5
    assert best_threshold_accuracy(members, non_members) == pytest.approx(
        (1.0 + 2 / 3) / 2)  # threshold 3: both members, 2 of 3 non-members


def test_the_study_tables_format_their_rows():
    from experiments.bench_wan import table as wan_table
    from experiments.hostile_sites import RULES
    from experiments.hostile_sites import table as hostile_table
    row = {"wall_s": 2.0, "train_s": 1.5, "bytes_up": 100, "bytes_down": 200}
    assert "1.50x" in wan_table({"lan": [row], "wan": [{**row, "wall_s": 3.0}]})
    result = {"accuracy": 0.8, "rejected_rounds": 5, "reasons": ["update norm 9 exceeds"]}
    text = hostile_table({"scaled": {rule: [result, result] for rule in RULES}})
    # 3 rules x 2 seeds x 5 rounds; 95% t-interval of identical values
    assert "rejected in 30 of 30 rounds" in text and "| 2 | 0.8000 ± 0.0000 |" in text


def test_bench_round_states_start_up_as_a_ratio_to_the_empty_app(caplog):
    import logging
    caplog.set_level(logging.INFO)
    bench_round.log_startup([10.0, 12.0, 11.0], [8.0, 8.0, 10.0], [13.0, 14.0, 15.0],
                            [20.0, 21.0, 22.0])
    assert "fed-dplora 11.0 s, empty Flower app (floor) 8.0 s, ours / floor 1.38x" in (
        caplog.text)
    assert "per repeat, ours / floor: 1.25x, 1.50x, 1.10x" in caplog.text
    assert "round 1 start (after round 0's evaluation): 14.0 s" in caplog.text


def test_bench_scale_reports_memory_growth_and_time_per_site(caplog):
    import logging

    from experiments.bench_scale import report_rounds, report_timing
    caplog.set_level(logging.INFO)
    memory = [{"round": r, "rss_mb": 100.0 + r, "wall_s": 2.0, "train_s": 1.0,
               "evaluate_s": 0.0, "server_s": 1.0, "engine_cpu_s": 0.5} for r in range(1, 4)]
    report_rounds(memory)
    report_timing([{"per_round": 10, "train_s": 5.0, "train_s_per_site": 0.5,
                    "evaluate_s": 0.0, "server_s": 0.2}])
    assert "RSS growth after round 2: +1.0%" in caplog.text
    assert "   10 |                 5.00 |    0.500" in caplog.text


def test_bench_scale_compares_federation_sizes_from_round_two(caplog):
    import logging

    from experiments.bench_scale import report_sizes, size_summary
    caplog.set_level(logging.INFO)

    def rounds(wall: list[float], rss: list[float]) -> list[dict]:
        return [{"round": i + 1, "rss_mb": m, "wall_s": w, "train_s": 1.0,
                 "evaluate_s": 0.5, "server_s": w - 1.5, "engine_cpu_s": w / 2}
                for i, (w, m) in enumerate(zip(wall, rss))]

    small = size_summary(100, rounds([30.0, 4.0, 5.0, 6.0], [500, 1000, 1000, 1050]),
                         {"census_s": 10.0})
    large = size_summary(1000, rounds([90.0, 5.0, 6.0, 7.0], [900, 2000, 2100, 2000]),
                         {"census_s": 60.0})
    assert small["wall_s"] == 5.0 and large["wall_s"] == 6.0  # round 1 left out
    assert small["rss_growth"] == pytest.approx(0.05) and large["rss_growth"] == 0.0
    report_sizes([small, large])
    assert small["engine_share"] == 0.5
    assert "1.20x |            6.00x" in caplog.text


def test_lm_reports_table_puts_each_round_below_the_base_model():
    from experiments.lm_report import table
    cell = {"config": {"method": "ffa", "privacy": {"level": "sample", "target_epsilon": 8}},
            "summary": {"wall_s": 12.0},
            "metrics": [{"eval_perplexity": 40.0, "eval_accuracy": 0.3,
                         "epsilon_sample": 4.0},
                        {"eval_perplexity": 30.0, "eval_accuracy": 0.35,
                         "epsilon_sample": 8.0}]}
    lines = table([cell], 50.0, 0.25)
    assert lines[2].startswith("| base model (before) | 50.00")
    assert lines[3] == "| ffa, ε = 8 | 40.00 | 30.00 | 0.3500 | 8.000 | 12 |"
