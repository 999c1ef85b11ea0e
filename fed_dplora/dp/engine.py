"""Clipped, noised gradients of one logical batch, from Opacus per-sample gradients.

`PoissonSampling` draws each logical batch (every record independently with probability
q). Opacus's `GradSampleModule` (hooks) computes per-sample gradients; this module clips
each to `max_grad_norm` over all trainable tensors jointly, sums over the physical
batches of one Poisson-sampled logical batch (virtual batching), adds
N(0, (noise_multiplier * max_grad_norm)^2) per coordinate (also to an empty batch), and
divides by the expected batch size. The accumulator counts the steps it noised and
reports the noise multiplier it used; with the sampler's q, that is what the ledger
charges.

Privacy (with `dp_sgd_steps` in `fed_dplora.privacy.events`): one record of this client,
add/remove neighbouring, Poisson sampling by `PoissonSampling` with the reported
probability, sensitivity `max_grad_norm` of the clipped sum. A trainable tensor without a
per-sample gradient raises, because it would train without DP.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from torch import nn

from fed_dplora.dp.guards import (CoverageError, NonFiniteGradient, check_on_device,
                                  check_supported_by_opacus)
from fed_dplora.dp.noise import RandomSource
from fed_dplora.privacy.events import sampling_probability


@dataclass(frozen=True)
class PoissonSampling:
    """Each logical batch: every one of `num_records` records independently with
    probability q = `sampling_probability(expected_batch, num_records)`; the batch may
    be empty (the step is still noised)."""

    num_records: int
    probability: float
    source: RandomSource

    @classmethod
    def for_batch(cls, expected_batch: int, num_records: int, source: RandomSource
                  ) -> "PoissonSampling":
        return cls(num_records, sampling_probability(expected_batch, num_records), source)

    def draw(self) -> list[int]:
        drawn = self.source.uniform(self.num_records) < self.probability
        return torch.nonzero(drawn).flatten().tolist()


@dataclass(frozen=True)
class DpSgdConfig:
    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: int
    # A per-sample gradient with a NaN or inf: zeroed before clipping (a deployed site,
    # where an error would tell which record), else `NonFiniteGradient` (clamp(nan) is
    # NaN: unhandled, one such record makes the whole release NaN whatever sigma).
    zero_nonfinite: bool = False


@dataclass(frozen=True)
class StepStats:
    """What one logical step really did, before the optimizer applied it."""

    examples: int
    clipped: int
    signal_norm: float  # ||sum of clipped per-sample grads|| / expected batch, pre-noise
    noise_multiplier: float
    nonfinite: int = 0  # per-sample gradients zeroed for holding a NaN or inf


def wrap_for_per_sample_grads(model: nn.Module, device: torch.device, functorch: bool = False
                              ) -> GradSampleModule:
    """Attach Opacus hooks to the PEFT-wrapped model, which must already be on `device`.

    `functorch=True` computes every per-sample gradient with torch.func instead of
    Opacus' per-layer formulas (compared in experiments/bench_dp_step.py; both pass
    the exactness tests).
    """
    check_on_device(model, device, "before Opacus wraps it")
    check_supported_by_opacus(model)
    # Opacus hooks on the first LoRA layers see inputs that need no grad (frozen base);
    # torch then warns once per process although the per-sample gradients are exact.
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients "
                            "are computed with respect to module outputs")
    return GradSampleModule(model, batch_first=True, loss_reduction="sum",
                            force_functorch=functorch)


class DpSgdAccumulator:
    """Accumulates clipped per-sample gradients over physical batches, then noises."""

    def __init__(self, module: GradSampleModule, config: DpSgdConfig,
                 noise: RandomSource) -> None:
        sigma, clip = config.noise_multiplier, config.max_grad_norm
        if not (0 <= sigma < math.inf and 0 < clip < math.inf):
            raise ValueError(f"invalid DP-SGD config {config}: the noise multiplier must be "
                             "finite and >= 0, the clip norm finite and > 0")
        self.config = config
        self.noise = noise
        self.named_params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._sums: list[torch.Tensor] = []
        self._examples = self._clipped = self._nonfinite = 0
        self.steps = 0  # logical steps noised so far

    def begin(self) -> None:
        self._sums = [torch.zeros_like(p) for _, p in self.named_params]
        self._examples = self._clipped = self._nonfinite = 0
        self._clear()

    def add_physical_batch(self, batch_size: int) -> None:
        """Clip and add the per-sample gradients of the backward pass just taken."""
        grad_samples = []
        for name, param in self.named_params:
            grad_sample = getattr(param, "grad_sample", None)
            if grad_sample is None:
                raise CoverageError(
                    f"{name} requires grad but got no per-sample gradient: it would train "
                    "without clipping or noise. Freeze it, or use a layer Opacus supports.")
            if grad_sample.shape[0] != batch_size:
                raise CoverageError(f"{name}: {grad_sample.shape[0]} per-sample gradients "
                                    f"for a batch of {batch_size}")
            # bf16 under CUDA autocast: clip and sum in the parameter's precision
            grad_samples.append(grad_sample.to(param.dtype))
        norms = torch.stack([g.reshape(g.shape[0], -1).norm(2, dim=1)
                             for g in grad_samples], dim=1).norm(2, dim=1)
        grad_samples, norms = self._finite(grad_samples, norms)
        factors = (self.config.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for total, grad_sample in zip(self._sums, grad_samples):
            total.add_(torch.einsum("i,i...->...", factors.to(grad_sample.dtype), grad_sample))
        self._examples += int(norms.shape[0])
        self._clipped += int((norms > self.config.max_grad_norm).sum())
        self._clear()

    def _finite(self, grad_samples: list[torch.Tensor], norms: torch.Tensor
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The per-sample gradients and norms with every non-finite record's zeroed
        (`zero_nonfinite`), or `NonFiniteGradient`."""
        finite = torch.isfinite(norms)
        if bool(finite.all()):
            return grad_samples, norms
        if not self.config.zero_nonfinite:
            raise NonFiniteGradient(
                f"{int((~finite).sum())} per-sample gradient(s) hold a NaN or inf: clipping "
                "cannot bound them, and the release would be NaN whatever the noise")
        self._nonfinite += int((~finite).sum())
        keep = [finite.view(-1, *([1] * (g.dim() - 1))) for g in grad_samples]
        return ([torch.where(k, g, torch.zeros_like(g)) for k, g in zip(keep, grad_samples)],
                torch.where(finite, norms, torch.zeros_like(norms)))

    def finish(self) -> StepStats:
        """Set each `param.grad` to (clipped sum + noise) / expected batch size."""
        std = self.config.noise_multiplier * self.config.max_grad_norm
        signal_sq = 0.0
        for (_, param), total in zip(self.named_params, self._sums):
            signal_sq += float(total.double().pow(2).sum())
            noise = self.noise.normal(tuple(total.shape), std, total.device, total.dtype)
            param.grad = (total + noise) / self.config.expected_batch_size
        self.steps += 1
        return StepStats(self._examples, self._clipped,
                         signal_sq ** 0.5 / self.config.expected_batch_size,
                         self.config.noise_multiplier, self._nonfinite)

    def _clear(self) -> None:
        for _, param in self.named_params:
            param.grad_sample = None
            param.grad = None


class PlainAccumulator:
    """Non-private twin: the plain mean gradient over the logical batch."""

    def __init__(self, model: nn.Module, expected_batch_size: int) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.expected_batch_size = expected_batch_size
        self._examples = 0
        self.steps = 0

    def begin(self) -> None:
        self._examples = 0
        for param in self.params:
            param.grad = None

    def add_physical_batch(self, batch_size: int) -> None:
        self._examples += batch_size

    def finish(self) -> StepStats:
        signal_sq = 0.0
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad /= self.expected_batch_size
            signal_sq += float(param.grad.double().pow(2).sum())
        self.steps += 1
        return StepStats(self._examples, 0, signal_sq ** 0.5, 0.0)
