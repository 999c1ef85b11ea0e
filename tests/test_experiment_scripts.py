"""Experiment scripts' own code runs (seconds each, tiny models), so a script whose
figures the docs quote cannot break unnoticed."""

from __future__ import annotations

import argparse

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
