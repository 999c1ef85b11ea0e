"""FedSA-LoRA: A and the head are shared and averaged, each site keeps its own B in its
own storage (surviving a crash and resume), evaluation is per site as well as global."""

from __future__ import annotations

import numpy as np
import pytest

import server.federation as federation_module
from experiments.local_grid import run_federation
from fed_dplora.config import ConfigError, parse_run_config
from fed_dplora.lora.adapters import global_arrays, trainable_arrays
from fed_dplora.lora.model import ModelRecipe, build_lora_model
from fed_dplora.methods import method_for
from fed_dplora.methods.base import kind_of
from fed_dplora.run.results import read_base_score, read_metrics
from fed_dplora.site.state import SiteState
from fed_dplora.site.trainer import LocalTrainer
from strategies import LoraFedAvg, to_arrays
from strategies.wire import payload_bytes
from test_aggregation import flower_task  # noqa: F401 (fixture)
from test_rolora import A, HEAD, exchange
from test_model_factory import CPU, recipe
from test_train import data, plan  # noqa: F401 (fixture)

FEDSA = method_for("fedsa")


@pytest.mark.parametrize("level", ["client", "both"])
def test_client_level_dp_is_refused_naming_what_it_would_not_cover(level):
    with pytest.raises(ConfigError, match=rf"privacy.level='{level}' with method='fedsa': "
                                          r"each site's own B.*valid levels for it are "
                                          r"\['none', 'sample'\]"):
        parse_run_config({"method": "fedsa", "privacy.level": level})
    assert parse_run_config({"method": "fedsa"}).privacy.level == "sample"


def test_a_site_keeps_its_last_two_rounds_and_a_replayed_round_starts_before_itself(
        tmp_path):
    state = SiteState(tmp_path, "run-key", "site-a")
    assert state.load(1) is None
    for rnd in (1, 3, 4):
        state.save(rnd, {"b": np.full(2, float(rnd))})
    assert [f.name for f in sorted(state.folder.iterdir())] == ["round-3.npz", "round-4.npz"]
    assert state.load(5)["b"][0] == 4.0
    assert state.load(4)["b"][0] == 3.0  # round 4 replayed after a crash
    other_run, other_site = SiteState(tmp_path, "key-2", "site-a"), SiteState(
        tmp_path, "run-key", "site-b")
    assert other_run.load(9) is None and other_site.load(9) is None
    with pytest.raises(ValueError, match="run-key"):
        SiteState(tmp_path, "", "site-a")


def test_a_site_trains_its_own_b_returns_only_a_and_the_head(tiny_bert, data):
    """B trains (with per-sample gradients: the accumulator refuses a trained tensor
    without them) but never leaves; a site without state starts from B = 0 even on a
    trainer that served another site before (simulated sites share a worker)."""
    trainer = LocalTrainer(recipe(tiny_bert, "fedsa"), CPU, private=True)
    sent = {n: a for n, a in trainable_arrays(trainer.model).items()
            if n in trainer.global_names}
    assert {kind_of(n) for n in sent} == {"A", "head"}
    assert {kind_of(n) for n in trainer.initial_local} == {"B"}
    out, _ = trainer.train(sent, plan(), data)
    assert set(out) == set(sent)
    kept = trainer.local_arrays()
    assert all(kept[n].any() and not trainer.initial_local[n].any() for n in kept)
    trainer.evaluate(out, data, 64)  # another site, without state
    assert not any(trainer.local_arrays()[n].any() for n in kept)
    trainer.evaluate(out, data, 64, kept)
    assert all(np.array_equal(trainer.local_arrays()[n], kept[n]) for n in kept)


def test_a_fedsa_federation_shares_a_and_the_head_and_scores_each_site_on_its_own(
        config):
    run = {**config, "method": "fedsa", "num-server-rounds": 2}
    run_federation(run, 2)
    rows = read_metrics(f"{run['output-dir']}/{run['run-name']}")
    model = build_lora_model(ModelRecipe.from_spec(parse_run_config(run), 3), CPU)
    shared = global_arrays(model, FEDSA)
    assert {kind_of(n) for n in shared} == {"A", "head"}
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["replies"] == 2 and not row["lost"]
        assert row["aggregation_error"] is None  # B never leaves: no product to compare
        assert row["bytes_up"] == 2 * payload_bytes(shared)
        assert row["bytes_down"] == 4 * payload_bytes(shared)
        assert row["personal_eval_loss"] != row["eval_loss"]  # each under its own B
        assert 0 <= row["personal_eval_accuracy"] <= 1
    base = read_base_score(f"{run['output-dir']}/{run['run-name']}")
    assert base["personal_eval_loss"] == base["eval_loss"]  # no site has a B yet: B = 0


def test_a_resumed_round_continues_each_site_from_its_state_before_that_round(
        config, monkeypatch):
    """The server crashes after round 2's training; resumed, round 2 runs again and each
    site starts it from its state of round 1, not from the crashed attempt's."""
    run = {**config, "method": "fedsa", "num-server-rounds": 2}
    real_commit, loads = federation_module.Federation._commit, []

    def crash_at_round_2(self, rnd, row):
        if rnd == 2:
            raise RuntimeError("server killed")
        real_commit(self, rnd, row)

    monkeypatch.setattr(federation_module.Federation, "_commit", crash_at_round_2)
    with pytest.raises(RuntimeError, match="server killed"):
        run_federation(run, 2)
    monkeypatch.setattr(federation_module.Federation, "_commit", real_commit)
    real_load = SiteState.load

    def spy(self, before_round):
        rounds = sorted(int(f.stem.split("-")[1]) for f in self.folder.glob("round-*.npz"))
        loads.append((before_round, rounds))
        return real_load(self, before_round)

    monkeypatch.setattr(SiteState, "load", spy)
    run_federation({**run, "resume": True}, 2)
    trained = [(before, rounds) for before, rounds in loads if before == 2]
    assert len(trained) == 2 and all(rounds == [1, 2] for _, rounds in trained)
    rows = read_metrics(f"{run['output-dir']}/{run['run-name']}")
    assert [r["round"] for r in rows] == [1, 2]


def test_the_server_averages_a_and_the_head_and_reports_no_aggregation_error():
    """Hand computation: the released A and head are the census-weighted means of the
    replies'; with no B among them there is no product to compare."""
    rng = np.random.default_rng(6)
    sent = {A: rng.normal(size=(2, 5)).astype(np.float32),
            HEAD: rng.normal(size=(3, 4)).astype(np.float32)}
    updates = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in sent.items()}
               for _ in range(2)]
    strategy = LoraFedAvg(method=FEDSA, min_available_nodes=0, sizes={1: 10, 2: 30},
                          node_sampler=lambda rnd, nodes: nodes)
    arrays, metrics = exchange(strategy, 1, sent, [(updates[0], 10), (updates[1], 30)])
    released = to_arrays(arrays)
    for k in sent:
        np.testing.assert_allclose(released[k], 0.25 * updates[0][k] + 0.75 * updates[1][k],
                                   rtol=1e-6)
    assert "aggregation-error" not in metrics and metrics["lost"] == 0
