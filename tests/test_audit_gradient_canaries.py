"""The white-box audit: canaries are records of norm max_grad_norm on coordinates of their
own, sampled like records, and its scores find them where noise allows only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.audit_gradient_canaries import (CanaryAccumulator, Federation,
                                                 draw_canaries, train_and_score)
from experiments.audit_one_run import audit
from fed_dplora.config import parse_run_config
from fed_dplora.data.demo import LABELS, generate_site
from fed_dplora.data.sources import LabelledText
from fed_dplora.data.tokenize import tokenize
from fed_dplora.dp.engine import DpSgdAccumulator, DpSgdConfig, wrap_for_per_sample_grads
from fed_dplora.dp.noise import SeededRandom
from fed_dplora.lora.adapters import trainable_arrays
from fed_dplora.lora.model import build_lora_model, load_tokenizer
from fed_dplora.privacy.plan import plan_sample_level
from test_model_factory import CPU, recipe


def test_canaries_sit_on_distinct_coordinates_of_the_trained_tensors():
    shapes = {"b": (5,), "a": (3, 4)}
    canaries = draw_canaries(17, 3, shapes, seed=0)  # every coordinate there is
    pairs = set(zip(canaries.tensor, canaries.coordinate.tolist()))
    assert pairs == {("a", i) for i in range(12)} | {("b", i) for i in range(5)}
    assert set(canaries.site.tolist()) <= {0, 1, 2}
    many = draw_canaries(2000, 4, {"w": (100, 100)}, seed=1)
    assert len(set(many.coordinate.tolist())) == 2000
    assert 900 < many.included.sum() < 1100
    assert sorted(np.bincount(many.site)) == pytest.approx([500] * 4, abs=80)


def grads_after_one_batch(tiny_bert, probability, pushes):
    """Each trained tensor's noiseless gradient over one batch, with `pushes` canaries
    sampled at `probability`; and the trained tensors' names."""
    model = build_lora_model(recipe(tiny_bert, "ffa"), CPU)
    module = wrap_for_per_sample_grads(model, CPU)
    inner = DpSgdAccumulator(module, DpSgdConfig(0.0, 0.5, 4), SeededRandom(0))
    accumulator = CanaryAccumulator(inner, pushes, probability, np.random.default_rng(0))
    texts, labels = generate_site(0, 4, 0)
    data = tokenize(LabelledText(tuple(texts), tuple(labels)),
                    load_tokenizer(recipe(tiny_bert, "ffa").model), 32, LABELS)
    ids, mask, y = data.batch(list(range(4)), CPU)
    accumulator.begin()
    torch.nn.functional.cross_entropy(module(ids, mask), y, reduction="sum").backward()
    accumulator.add_physical_batch(4)
    accumulator.finish()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_sampled_canary_adds_max_grad_norm_on_its_coordinate_and_nothing_else(tiny_bert):
    name = next(n for n in trainable_arrays(build_lora_model(recipe(tiny_bert, "ffa"), CPU))
                if ".lora_B." in n)
    clean = grads_after_one_batch(tiny_bert, 1.0, [])
    pushed = grads_after_one_batch(tiny_bert, 1.0, [(name, 3)])
    skipped = grads_after_one_batch(tiny_bert, 0.0, [(name, 3)])
    for tensor in clean:
        difference = (pushed[tensor] - clean[tensor]).flatten()
        expected = torch.zeros_like(difference)
        if tensor == name:
            expected[3] = 0.5 / 4  # max_grad_norm over the expected batch
        torch.testing.assert_close(difference, expected, rtol=0, atol=1e-6)
        assert torch.equal(skipped[tensor], clean[tensor])


def test_canaries_are_sampled_at_the_sites_rate():
    class Inner:
        named_params = [("_module.w", None)]
        steps = 0
        config = DpSgdConfig(1.0, 1.0, 1)
        _sums = [torch.zeros(400)]

        def finish(self):
            return None
    inner = Inner()
    accumulator = CanaryAccumulator(inner, [("w", i) for i in range(400)], 0.1,
                                    np.random.default_rng(3))
    for _ in range(50):
        accumulator.finish()
    assert accumulator.sampled == pytest.approx(0.1 * 400 * 50, rel=0.05)
    assert float(inner._sums[0].sum()) == accumulator.sampled


def tiny_federation(tiny_bert) -> Federation:
    spec = parse_run_config({"batch-size": 32, "physical-batch-size": 32,
                             "local-steps": 4, "optimizer": "sgd", "learning-rate": 0.5,
                             "privacy.level": "sample"})
    tokenizer = load_tokenizer(recipe(tiny_bert, "ffa").model)
    sites = [tokenize(LabelledText(*map(tuple, generate_site(s, 160, 0))), tokenizer, 32,
                      LABELS) for s in range(2)]
    return Federation(spec, sites, sites, recipe(tiny_bert, "ffa"))


@pytest.mark.parametrize("sigma, leaks", [(1e-3, True), (50.0, False)])
def test_the_scores_find_the_canaries_without_noise_and_not_under_heavy_noise(
        tiny_bert, sigma, leaks):
    federation = tiny_federation(tiny_bert)
    shapes = {n: a.shape for n, a in trainable_arrays(
        build_lora_model(federation.recipe, CPU)).items()}
    canaries = draw_canaries(200, 2, shapes, seed=0)
    plan = plan_sample_level(1e12, None, 32, federation.sizes(), 12, sigma)
    scores, _, _ = train_and_score(federation, plan, canaries, rounds=3, seed=0)
    result = audit(-scores, canaries.included, plan.delta)
    assert (result["epsilon_lower_bound"] > 0) == leaks
    assert (result["p_no_leak"] < 1e-3) == leaks
