"""experiments.bench_worker_memory runs a worker's life and measures its memory."""

from __future__ import annotations

import pytest

from experiments import bench_worker_memory


def test_a_short_worker_life_reports_memory_per_round(tiny_bert):
    memory, trimming = bench_worker_memory.worker_life(sites=4, rounds=2, trim=True,
                                                       model=tiny_bert)
    assert len(memory) == 2 and all(200 < mb < 20_000 for mb in memory)
    assert 0 < trimming < 1  # a share of round 2's time


def test_growth_is_measured_from_round_2():
    assert bench_worker_memory.growth([500.0, 800.0, 840.0, 880.0]) == pytest.approx(0.1)
