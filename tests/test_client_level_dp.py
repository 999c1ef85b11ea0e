"""DP-FedAvg aggregation: clipping really bounds a client, noise has the stated std;
checkpoints are whole or absent."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fed_dplora.run.checkpoint import Checkpoint
from fed_dplora.dp.fedavg import dp_fedavg
from fed_dplora.dp.noise import SecureRandom, SeededRandom

rng = np.random.default_rng(0)
GLOBAL = {"b1": rng.normal(size=(8, 4)).astype(np.float32),
          "b2": rng.normal(size=(16,)).astype(np.float32)}
S, M = 0.5, 4


def client(scale=0.01):
    return {k: v + scale * rng.normal(size=v.shape).astype(np.float32)
            for k, v in GLOBAL.items()}


def moved(new):
    return float(np.sqrt(sum(np.sum((new[k].astype(np.float64) - GLOBAL[k]) ** 2)
                             for k in GLOBAL)))


def test_one_client_scaled_by_a_million_moves_the_aggregate_by_at_most_s_over_m():
    honest = [client() for _ in range(3)]
    attacker = {k: GLOBAL[k] + 1e6 * (client()[k] - GLOBAL[k]) for k in GLOBAL}
    without, _ = dp_fedavg(GLOBAL, honest, S, 0.0, M, SeededRandom(0))
    with_attacker, stats = dp_fedavg(GLOBAL, honest + [attacker], S, 0.0, M, SeededRandom(0))
    shift = float(np.sqrt(sum(np.sum((with_attacker[k].astype(np.float64) - without[k]) ** 2)
                              for k in GLOBAL)))
    assert shift <= S / M * (1 + 1e-5)
    assert shift > 0.99 * S / M  # the attacker's update was clipped to exactly S
    assert stats.clipped == 1 and stats.clip_fraction == 0.25
    assert stats.update_norms[-1] > 1e3


def test_unclipped_noise_free_aggregate_is_sum_over_fixed_denominator():
    updates = [client() for _ in range(2)]  # two answered, four expected
    new, stats = dp_fedavg(GLOBAL, updates, 1e6, 0.0, M, SeededRandom(0))
    for k in GLOBAL:
        expected = GLOBAL[k] + sum(u[k].astype(np.float64) - GLOBAL[k] for u in updates) / M
        np.testing.assert_allclose(new[k], expected, rtol=1e-6, atol=1e-7)
        assert new[k].dtype == np.float32
    assert stats.clipped == 0


@pytest.mark.parametrize("source", [SeededRandom(3), SecureRandom()], ids=["seeded", "secure"])
def test_noise_on_zero_updates_has_std_z_s_over_m(source):
    z = 1.3
    big = {"b": np.zeros(200_000, dtype=np.float32)}
    new, stats = dp_fedavg(big, [dict(big), dict(big)], S, z, M, source)
    assert stats.noise_multiplier == z
    assert float(np.std(new["b"])) == pytest.approx(z * S / M, rel=0.01)
    assert abs(float(np.mean(new["b"]))) < 0.01 * z * S / M
    # no client at all (Poisson sampling can pick none): noise is still added
    alone, _ = dp_fedavg(big, [], S, z, M, source)
    assert float(np.std(alone["b"])) == pytest.approx(z * S / M, rel=0.01)


def test_mismatched_tensors_are_refused():
    with pytest.raises(ValueError, match="different tensors"):
        dp_fedavg(GLOBAL, [{"b1": GLOBAL["b1"]}], S, 1.0, M, SeededRandom(0))


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    first = Checkpoint(1, {"b": np.ones(3, np.float32)}, {"sample": {"x": 1}}, {"sizes": {}})
    first.save(tmp_path)

    def crash(*args):
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        Checkpoint(2, {"b": np.zeros(3, np.float32)}, {}, {"sizes": {}}).save(tmp_path)
    monkeypatch.undo()
    loaded = Checkpoint.load(tmp_path)
    assert loaded.round == 1 and loaded.ledgers == {"sample": {"x": 1}}
    np.testing.assert_array_equal(loaded.arrays["b"], first.arrays["b"])
