"""DP-SGD exactness against a hand computation, measured noise, and the guards."""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fed_dplora.lora.model as model_module
from fed_dplora.dp import guards
from fed_dplora.dp.engine import (DpSgdAccumulator, DpSgdConfig, PoissonSampling,
                                  wrap_for_per_sample_grads)
from fed_dplora.dp.noise import SecureRandom, SeededRandom
from fed_dplora.lora.model import build_lora_model
from test_model_factory import CPU, recipe, with_nonzero_b

BATCH = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15, 16, 17, 18], [19, 20, 21], [22]]
LABELS = torch.tensor([0, 1, 2, 1, 0, 2])


def padded(rows):
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def model_with_nonzero_b(path, method, targets, pooling):
    return with_nonzero_b(build_lora_model(
        recipe(path, method, targets=targets, pooling=pooling), CPU))


def hand_clipped_mean(model, clip):
    """Per-sample gradients by autograd, one example at a time, clipped, averaged."""
    params = [p for p in model.parameters() if p.requires_grad]
    ids, mask = padded(BATCH)
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(BATCH)):
        logits = model(ids[i:i + 1, :len(BATCH[i])], mask[i:i + 1, :len(BATCH[i])])
        grads = torch.autograd.grad(F.cross_entropy(logits, LABELS[i:i + 1]), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, clip / float(norm))
        for t, g in zip(total, grads):
            t += g * factor
    return [t / len(BATCH) for t in total]


def engine_gradient(model, clip, physical=4, functorch=False):
    gsm = wrap_for_per_sample_grads(model, CPU, functorch)
    acc = DpSgdAccumulator(gsm, DpSgdConfig(0.0, clip, len(BATCH)), SeededRandom(0))
    acc.begin()
    for lo in range(0, len(BATCH), physical):  # two physical batches: virtual batching
        ids, mask = padded(BATCH[lo:lo + physical])
        loss = F.cross_entropy(gsm(ids, mask), LABELS[lo:lo + physical], reduction="sum")
        loss.backward()
        acc.add_physical_batch(ids.shape[0])
    stats = acc.finish()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad], stats


CASES = [("bert", "ffa", ("query", "value"), "mean"),
         ("bert", "vanilla", ("query", "value"), "mean"),
         ("gpt2", "ffa", ("c_attn",), "last"),
         ("gpt2", "vanilla", ("c_attn",), "mean")]


@pytest.mark.parametrize("arch,method,targets,pooling", CASES)
@pytest.mark.parametrize("clip", [1e6, 1e-4], ids=["no-clipping", "all-clipped"])
@pytest.mark.parametrize("functorch", [False, True], ids=["hooks", "functorch"])
def test_noise_free_gradient_equals_clipped_per_sample_mean(
        request, arch, method, targets, pooling, clip, functorch):
    path = request.getfixturevalue(f"tiny_{arch}")
    model = model_with_nonzero_b(path, method, targets, pooling)
    expected = hand_clipped_mean(model, clip)
    got, stats = engine_gradient(model, clip, functorch=functorch)
    assert stats.examples == len(BATCH)
    assert stats.clipped == (0 if clip > 1 else len(BATCH))
    scale = max(float(e.abs().max()) for e in expected)
    assert scale > 0
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * scale)


def test_no_clipping_no_noise_equals_plain_mean_gradient(tiny_bert):
    model = model_with_nonzero_b(tiny_bert, "vanilla", ("query", "value"), "mean")
    params = [p for p in model.parameters() if p.requires_grad]
    plain = torch.autograd.grad(
        sum(F.cross_entropy(model(*padded([r])), LABELS[i:i + 1])
            for i, r in enumerate(BATCH)) / len(BATCH), params)
    got, _ = engine_gradient(model, 1e6)
    for e, g in zip(plain, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("source", [SeededRandom(0), SecureRandom()],
                         ids=["seeded", "secure"])
def test_empty_batch_still_gets_noise_of_the_stated_std(tiny_bert, source):
    model = build_lora_model(recipe(tiny_bert, "vanilla"), CPU)
    gsm = wrap_for_per_sample_grads(model, CPU)
    sigma, clip, batch = 1.7, 0.5, 8
    acc = DpSgdAccumulator(gsm, DpSgdConfig(sigma, clip, batch), source)
    draws = []
    for _ in range(10):
        acc.begin()  # Poisson drew nobody
        stats = acc.finish()
        assert stats.examples == 0
        draws += [p.grad.flatten() for p in model.parameters() if p.requires_grad]
    assert acc.steps == 10  # noised steps are counted, empty ones too: the ledger's count
    noise = torch.cat(draws)
    assert noise.numel() > 10000
    assert float(noise.std()) == pytest.approx(sigma * clip / batch, rel=0.05)
    assert abs(float(noise.mean())) < 0.05 * sigma * clip / batch


def test_secure_source_is_gaussian_uniform_and_unpredictable():
    source = SecureRandom()
    u = source.uniform(200_000)
    assert 0 < float(u.min()) and float(u.max()) <= 1
    assert float(u.mean()) == pytest.approx(0.5, abs=0.005)
    z = source.normal((200_000,), 2.0, CPU, torch.float64) / 2.0
    assert float(z.std()) == pytest.approx(1.0, rel=0.01)
    # Gaussian shape, not just its variance: mass within 1 and 2 standard deviations.
    assert float((z.abs() < 1).double().mean()) == pytest.approx(0.6827, abs=0.005)
    assert float((z.abs() < 2).double().mean()) == pytest.approx(0.9545, abs=0.003)
    again = SecureRandom().normal((1000,), 1.0, CPU, torch.float64)
    assert not torch.equal(again, source.normal((1000,), 1.0, CPU, torch.float64))
    seeded = [SeededRandom(7).normal((5,), 1.0, CPU, torch.float32) for _ in range(2)]
    assert torch.equal(*seeded)


def test_parameter_without_per_sample_gradient_is_an_error(tiny_bert):
    model = build_lora_model(recipe(tiny_bert, "ffa"), CPU)
    pooler = model.base_model.model.backbone.pooler.dense.weight
    pooler.requires_grad_(True)  # trainable, but the mean-pooled loss never reaches it
    with pytest.raises(guards.CoverageError, match="pooler.*no per-sample gradient"):
        engine_gradient(model, 1.0)


def test_trainable_module_opacus_cannot_privatize_is_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(guards.CoverageError, match="BatchNorm"):
        wrap_for_per_sample_grads(model, CPU)
    model[1].requires_grad_(False)
    wrap_for_per_sample_grads(model, CPU)  # frozen BatchNorm is harmless


def test_stale_parameter_copies_are_caught(tiny_bert):
    """The published failure: the optimizer steps copies; the model never moves."""
    model = build_lora_model(recipe(tiny_bert, "ffa"), CPU)
    stale = copy.deepcopy(model)  # e.g. optimizer built before a re-wrap or .to()
    optimizer = torch.optim.SGD([p for p in stale.parameters() if p.requires_grad], lr=0.5)
    with pytest.raises(guards.GuardError, match="stale copies"):
        guards.check_optimizer_holds_model_params(optimizer, model)
    # Without that check, a step "works": loss and epsilon look normal, weights do not.
    engine_gradient(model, 1.0)
    for p, s in zip(model.parameters(), stale.parameters()):
        s.grad = None if p.grad is None else p.grad.clone()
    before, frozen = guards.snapshot_trainable(model), guards.frozen_checksum(model)
    optimizer.step()
    max_delta = max(float((p.detach() - before[n]).abs().max())
                    for n, p in model.named_parameters() if n in before)
    assert max_delta == 0.0
    with pytest.raises(guards.GuardError, match="did not move"):
        guards.check_update_applied(model, before, frozen)


def test_frozen_tensor_that_moves_is_caught(tiny_bert):
    model = build_lora_model(recipe(tiny_bert, "ffa"), CPU)
    before, frozen = guards.snapshot_trainable(model), guards.frozen_checksum(model)
    with torch.no_grad():
        a = next(p for n, p in model.named_parameters() if ".lora_A." in n)
        a.add_(1e-3)  # FFA's A must never move
    with pytest.raises(guards.GuardError, match="frozen tensors changed"):
        guards.check_update_applied(model, before, frozen)


def test_zero_clipped_signal_is_caught_and_empty_batch_is_not():
    with pytest.raises(guards.GuardError, match="signal"):
        guards.check_signal(0.0, examples=12)
    guards.check_signal(0.0, examples=0)
    guards.check_signal(1e-3, examples=12)


def test_parameter_off_device_is_caught(tiny_bert):
    model = build_lora_model(recipe(tiny_bert, "ffa"), CPU)
    guards.check_on_device(model, CPU, "now")
    model.base_model.model.classifier.modules_to_save.default.to("meta")
    with pytest.raises(guards.GuardError, match="meta"):
        guards.check_on_device(model, CPU, "now")


def test_the_order_guard_compares_the_whole_device_not_its_type():
    """cuda:1 is not cuda:0 (no GPU needed: the tensors only report their device)."""
    class OnDevice(torch.nn.Module):
        def __init__(self, device):
            super().__init__()
            self.device = device

        def named_parameters(self, *args, **kwargs):
            return [("w", types.SimpleNamespace(device=self.device))]

    guards.check_on_device(OnDevice(torch.device("cuda", 0)), torch.device("cuda", 0), "now")
    with pytest.raises(guards.GuardError, match="cuda:1"):
        guards.check_on_device(OnDevice(torch.device("cuda", 1)), torch.device("cuda", 0),
                               "now")


def test_a_model_placed_on_its_device_after_peft_or_after_opacus_is_refused(
        tiny_bert, monkeypatch):
    """The order is checked at each wrap, not only the final device ("meta" stands in
    for the accelerator here; experiments/gpu_check runs the CUDA case)."""
    meta = torch.device("meta")
    model = build_lora_model(recipe(tiny_bert, "ffa"), CPU)
    with pytest.raises(guards.GuardError, match="expected meta before Opacus wraps it"):
        wrap_for_per_sample_grads(model, meta)  # PEFT model still on CPU: moved later
    built_elsewhere = model_module.build_base_model
    monkeypatch.setattr(model_module, "build_base_model",
                        lambda r, device: built_elsewhere(r, CPU))  # base left on CPU
    with pytest.raises(guards.GuardError, match="expected meta before PEFT wraps it"):
        build_lora_model(recipe(tiny_bert, "ffa"), meta)


def test_poisson_sampling_draws_each_record_independently_with_probability_q():
    sampling = PoissonSampling.for_batch(32, 400, SeededRandom(0))
    assert sampling.probability == 32 / 400
    sizes = [len(sampling.draw()) for _ in range(3000)]
    assert float(np.mean(sizes)) == pytest.approx(32, rel=0.02)
    # binomial(400, 0.08) sizes, not a fixed-size batch; records drawn uniformly
    assert float(np.var(sizes)) == pytest.approx(400 * 0.08 * 0.92, rel=0.1)
    assert PoissonSampling.for_batch(500, 400, SeededRandom(0)).probability == 1.0


def _linear_batch_gradient(zero_nonfinite: bool):
    """One physical batch of 3 records through a 2x2 linear layer, the second record's
    features NaN: (the accumulator's gradient, its stats, the hand-clipped mean of
    records 0 and 2 over the expected batch of 3)."""
    layer = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    features = torch.tensor([[1.0, 0.5], [float("nan"), 1.0], [-2.0, 1.0]])
    expected = torch.zeros(2, 2)
    for i in (0, 2):  # d(sum of outputs)/dW per record: ones(2) outer x_i
        grad = torch.ones(2, 1) * features[i]
        expected += grad * min(1.0, 1.0 / float(grad.norm()))
    gsm = wrap_for_per_sample_grads(layer, CPU)
    acc = DpSgdAccumulator(gsm, DpSgdConfig(0.0, 1.0, 3, zero_nonfinite), SeededRandom(0))
    acc.begin()
    gsm(features).sum().backward()
    acc.add_physical_batch(3)
    stats = acc.finish()
    return layer.weight.grad, stats, expected / 3


def test_a_non_finite_per_sample_gradient_is_zeroed_at_a_deployed_site():
    """clamp(nan) is NaN: unhandled, one record made the whole release NaN whatever
    sigma. Zeroed, the release is exactly the other records' clipped mean. Mutant
    killed: `DpSgdAccumulator._finite` not applied."""
    grad, stats, expected = _linear_batch_gradient(zero_nonfinite=True)
    assert torch.isfinite(grad).all() and stats.nonfinite == 1
    torch.testing.assert_close(grad, expected)


def test_a_non_finite_per_sample_gradient_raises_in_simulation():
    with pytest.raises(guards.NonFiniteGradient, match="NaN or inf"):
        _linear_batch_gradient(zero_nonfinite=False)


@pytest.mark.parametrize("sigma,clip", [(float("nan"), 1.0), (float("inf"), 1.0),
                                        (1.0, float("inf")), (1.0, float("nan"))])
def test_the_accumulator_refuses_a_non_finite_sigma_or_clip_norm(sigma, clip):
    gsm = wrap_for_per_sample_grads(torch.nn.Linear(2, 2), CPU)
    with pytest.raises(ValueError, match="finite"):
        DpSgdAccumulator(gsm, DpSgdConfig(sigma, clip, 3), SeededRandom(0))
