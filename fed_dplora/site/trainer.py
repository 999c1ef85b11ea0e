"""Local DP-SGD training and evaluation of one client, reusing its model across rounds."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from fed_dplora.class_scores import ClassCounts, summed
from fed_dplora.data.tokenize import TokenizedData
from fed_dplora.dp import guards
from fed_dplora.dp.engine import (DpSgdAccumulator, DpSgdConfig, PlainAccumulator,
                                  PoissonSampling, StepStats, wrap_for_per_sample_grads)
from fed_dplora.dp.noise import random_source
from fed_dplora.dp.update_bound import ADAM_BETAS, SGD_MOMENTUM
from fed_dplora.lora.adapters import (frozen_lora_fingerprint, load_trainable_arrays,
                                      trainable_arrays)
from fed_dplora.lora.model import ModelRecipe, build_lora_model
from fed_dplora.methods import method_for
from fed_dplora.refusals import PublicRefusal, ReleaseWithheld
from fed_dplora.tasks import task_for
from fed_dplora.tasks.base import Task

log = logging.getLogger(__name__)


class ProbeFailed(PublicRefusal):
    """A wiring check failed on the probe batch (public records): the round is declined."""


@dataclass(frozen=True)
class RoundPlan:
    """What the server asks of one client for one round."""

    local_steps: int
    batch_size: int  # expected (logical) Poisson batch
    physical_batch_size: int
    learning_rate: float
    optimizer: str  # "sgd" (momentum SGD_MOMENTUM) or "adam"
    noise_multiplier: float | None  # None: non-private training
    max_grad_norm: float
    seed: int  # Poisson sampling and noise, unless secure_noise
    secure_noise: bool = False  # draw sampling and noise from the OS CSPRNG instead
    server_round: int = 1  # what trains, for a method that alternates (RoLoRA)


@dataclass(frozen=True)
class TrainReport:
    """What the client really did: the ledger charges these values."""

    num_examples: int
    steps: int
    sampling_probability: float
    noise_multiplier: float  # as reported by the accumulator that added it; 0.0 if none
    train_loss: float  # mean per-example loss over the sampled examples
    clip_fraction: float
    compute_s: float


@dataclass(frozen=True)
class EvalReport:
    """Mean loss and accuracy per unit of `weight`: test records (classification) or
    predicted tokens (causal LM: next-token loss and accuracy)."""

    loss: float
    accuracy: float
    num_examples: int
    weight: int
    classes: ClassCounts | None = None  # classification: per-class counts


class LocalTrainer:
    """A model (and its Opacus hooks), built once per worker process and reused.

    Every round overwrites all global tensors from the server's arrays, so one
    trainer serves every client that the process simulates; only the data differ.
    """

    def __init__(self, recipe: ModelRecipe, device: torch.device, private: bool) -> None:
        self.device = device
        self.task = task_for(recipe.task)
        self.method = method_for(recipe.method)
        self.model = build_lora_model(recipe, device)
        trainable = trainable_arrays(self.model)
        self.global_names = frozenset(self.method.global_names(trainable))
        # A site's own tensors (FedSA's B), at their init for a site that has none yet
        self.initial_local = {n: a for n, a in trainable.items() if n not in self.global_names}
        self.private = private
        self.forward_module = (wrap_for_per_sample_grads(self.model, device) if private
                               else self.model)
        # The moved/frozen checks cost two passes over every weight: once per set of
        # trained tensors (its hooks and optimizer construction are the same each round).
        self.verified: set[frozenset[str]] = set()

    def train_only(self, names: frozenset[str]) -> None:
        """Train exactly `names` of the global tensors and the site's own (a round of a
        method that alternates); Opacus' hooks are attached again when the set changes
        (they are registered for the parameters that train when wrapping)."""
        if names == frozenset(trainable_names(self.model)):
            return
        for name, param in self.model.named_parameters():
            if name in self.global_names or name in self.initial_local:
                param.requires_grad_(name in names)
        if self.private:
            self.forward_module.remove_hooks()
            self.forward_module = wrap_for_per_sample_grads(self.model, self.device)

    def a_fingerprint(self) -> str:
        return frozen_lora_fingerprint(self.model)

    def probe(self, arrays: dict[str, np.ndarray], plan: RoundPlan, probe: TokenizedData,
              kept: dict[str, np.ndarray] | None = None) -> None:
        """A deployed site's wiring checks, on public records (`probe`: no private data)
        under the message's tensors, before any private step: the optimizer holds the
        model's parameters, every trainable tensor has per-sample gradients, the
        clipped signal is non-zero, exactly the trained tensors move in one step. Raises
        `ProbeFailed` (a `PublicRefusal`: the outcome depends on public inputs only);
        the tensors are loaded again by `train`."""
        self._prepare_round(arrays, plan, kept)
        probe_plan = dataclasses.replace(
            plan, batch_size=len(probe), physical_batch_size=len(probe),
            noise_multiplier=None if plan.noise_multiplier is None else 0.0)
        try:
            optimizer = make_optimizer(self.model, plan.optimizer, plan.learning_rate)
            guards.check_optimizer_holds_model_params(optimizer, self.model)
            stats, _ = self._logical_step(self._accumulator(probe_plan),
                                          list(range(len(probe))), probe_plan, probe)
            guards.check_signal(stats.signal_norm, stats.examples)
            before, frozen_before = (guards.snapshot_trainable(self.model),
                                     guards.frozen_checksum(self.model))
            optimizer.step()
            guards.check_update_applied(self.model, before, frozen_before)
        except guards.GuardError as err:
            raise ProbeFailed(f"the wiring check on a probe batch failed: {err}") from None

    def train(self, arrays: dict[str, np.ndarray], plan: RoundPlan, data: TokenizedData,
              kept: dict[str, np.ndarray] | None = None, withhold: bool = False,
              stop: Callable[[], None] | None = None
              ) -> tuple[dict[str, np.ndarray], TrainReport]:
        """Load the global tensors (and the site's own, `kept`, where the method has
        them), take `plan.local_steps` DP-SGD steps, return the global ones trained.

        `withhold` (a deployed site, after `probe`): a guard that fires on private data
        raises `ReleaseWithheld` (one text whatever fired; the detail is logged here),
        the signal check is logged only, and non-finite per-sample gradients are zeroed
        (counted in the log); otherwise each raises its own `GuardError`. `stop` is
        called before each step and ends the round by raising (nothing is returned).
        The report's (q, sigma, steps) come from the code that sampled and noised."""
        if len(data) == 0:
            raise ValueError("this client has no training records")
        start = time.perf_counter()
        trained = self._prepare_round(arrays, plan, kept)
        try:
            report = self._steps(plan, data, withhold, stop or _never)
        except guards.GuardError:
            if not withhold:
                raise
            log.exception("a check on private data stopped this round's release")
            raise ReleaseWithheld() from None
        report = dataclasses.replace(report, compute_s=time.perf_counter() - start)
        out = trainable_arrays(self.model)
        return {n: a for n, a in out.items() if n in trained}, report

    def _prepare_round(self, arrays: dict[str, np.ndarray], plan: RoundPlan,
                       kept: dict[str, np.ndarray] | None) -> set[str]:
        """Seed dropout (unless secure), load the tensors, train what the round trains;
        returns the global tensors it trains."""
        if not plan.secure_noise:
            torch.manual_seed(plan.seed + 2)  # dropout: a seeded round replays exactly
        self._load(arrays, kept)
        trained = self.method.trained(self.global_names, plan.server_round)
        self.train_only(frozenset(trained | set(self.initial_local)))
        self.model.train()
        return trained

    def _steps(self, plan: RoundPlan, data: TokenizedData, withhold: bool,
               stop: Callable[[], None]) -> TrainReport:
        """The round's DP-SGD steps on the private records (compute_s left at 0)."""
        optimizer = make_optimizer(self.model, plan.optimizer, plan.learning_rate)
        guards.check_optimizer_holds_model_params(optimizer, self.model)
        accumulator = self._accumulator(plan, zero_nonfinite=withhold)
        sampling = PoissonSampling.for_batch(plan.batch_size, len(data),
                                             random_source(plan.secure_noise, plan.seed))
        loss_sum, seen, clipped, checked, used_sigma, nonfinite = 0.0, 0, 0, False, 0.0, 0
        for _ in range(plan.local_steps):
            stop()
            stats, loss = self._logical_step(accumulator, sampling.draw(), plan, data)
            checked = self._apply(optimizer, stats, checked, strict_signal=not withhold)
            loss_sum += loss
            seen, clipped = seen + stats.examples, clipped + stats.clipped
            used_sigma, nonfinite = stats.noise_multiplier, nonfinite + stats.nonfinite
        if nonfinite:
            log.warning("%d non-finite per-sample gradients were zeroed before clipping "
                        "this round", nonfinite)
        return TrainReport(
            num_examples=len(data), steps=accumulator.steps,
            sampling_probability=sampling.probability, noise_multiplier=used_sigma,
            train_loss=loss_sum / max(seen, 1), clip_fraction=clipped / max(seen, 1),
            compute_s=0.0)

    def local_arrays(self) -> dict[str, np.ndarray]:
        """The site's own tensors now (after `train`: what it keeps for its next round)."""
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().to("cpu", torch.float32).numpy().copy()
                for n in self.initial_local}

    def _load(self, arrays: dict[str, np.ndarray], kept: dict[str, np.ndarray] | None
              ) -> None:
        load_trainable_arrays(self.model, arrays, self.global_names)
        if self.initial_local:
            load_trainable_arrays(self.model, kept or self.initial_local,
                                  set(self.initial_local))

    def _logical_step(self, accumulator: DpSgdAccumulator | PlainAccumulator,
                      indices: list[int], plan: RoundPlan, data: TokenizedData
                      ) -> tuple[StepStats, float]:
        """The noised gradient of one Poisson batch, over physical batches; its loss sum."""
        # Shortest first, so each physical batch pads to similar lengths. The logical
        # batch's clipped sum, and so its noisy gradient, does not depend on the split.
        indices.sort(key=data.length)
        accumulator.begin()
        loss_sum = 0.0
        for lo in range(0, len(indices), plan.physical_batch_size):
            chunk = indices[lo:lo + plan.physical_batch_size]
            ids, mask, labels = data.batch(chunk, self.device)
            with mixed_precision(self.device):
                logits = self.forward_module(ids, mask)
            loss = self.task.loss_sum(logits, ids, mask, labels)
            loss.backward()
            accumulator.add_physical_batch(len(chunk))
            loss_sum += float(loss.detach())
        return accumulator.finish(), loss_sum

    def _apply(self, optimizer: torch.optim.Optimizer, stats: StepStats, checked: bool,
               strict_signal: bool = True) -> bool:
        """One optimizer step. The round's first step with examples checks the clipped
        signal (raising, or with `strict_signal` False logging only); the first such
        step with each set of trained tensors also checks that exactly those moved.
        Returns whether the round's check has run."""
        check = not checked and stats.examples > 0
        trained = frozenset(trainable_names(self.model)) if check else frozenset()
        if check and strict_signal:
            guards.check_signal(stats.signal_norm, stats.examples)
        elif check and not stats.signal_norm > 0.0:
            log.warning("the clipped gradient signal of this round's first private batch "
                        "is zero (the probe batch's was not)")
        verify = check and trained not in self.verified
        if verify:
            before = guards.snapshot_trainable(self.model)
            frozen_before = guards.frozen_checksum(self.model)
        optimizer.step()
        if verify:
            guards.check_update_applied(self.model, before, frozen_before)
            self.verified.add(trained)
        optimizer.zero_grad(set_to_none=True)
        return checked or check

    def _accumulator(self, plan: RoundPlan, zero_nonfinite: bool = False
                     ) -> DpSgdAccumulator | PlainAccumulator:
        if plan.noise_multiplier is None:
            if self.private:
                raise ValueError("this client was built for DP but the round plan has no "
                                 "noise multiplier: refusing to train without noise")
            return PlainAccumulator(self.model, plan.batch_size)
        if not self.private:
            raise ValueError("the round plan asks for DP but this client was built "
                             "without per-sample gradients")
        noise = random_source(plan.secure_noise, plan.seed + 1, self.device)
        return DpSgdAccumulator(self.forward_module, DpSgdConfig(
            plan.noise_multiplier, plan.max_grad_norm, plan.batch_size, zero_nonfinite),
            noise)

    @torch.no_grad()
    def evaluate(self, arrays: dict[str, np.ndarray], data: TokenizedData,
                 batch_size: int, kept: dict[str, np.ndarray] | None = None) -> EvalReport:
        """Under the global tensors, and the site's own (`kept`, else their init)."""
        self._load(arrays, kept)
        return evaluate_model(self.model, self.task, data, batch_size, self.device)


def _never() -> None:
    """A stop check that never stops (simulation)."""


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def mixed_precision(device: torch.device, precision: str = "auto") -> AbstractContextManager:
    """Forward passes under bf16 autocast ("bf16"; "auto": on CUDA only) or in fp32.

    Parameters, per-sample gradients' clipping and sums, noise and the optimizer stay in
    fp32 (the accumulator casts per-sample gradients up before their norms).
    """
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def make_optimizer(model: torch.nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """A fresh optimizer over the model's own trainable parameter objects."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS)
    return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)


def evaluate_model(model: torch.nn.Module, task: Task, data: TokenizedData, batch_size: int,
                   device: torch.device) -> EvalReport:
    """The task's mean loss and accuracy over `data` (dropout off; back to train mode
    after)."""
    sums = [task.eval_sums(logits, ids, mask, labels)
            for _, ids, mask, labels, logits in _eval_batches(model, data, batch_size, device)]
    weight = sum(s.weight for s in sums)
    classes = [s.classes for s in sums if s.classes is not None]
    return EvalReport(sum(s.loss for s in sums) / max(weight, 1),
                      sum(s.correct for s in sums) / max(weight, 1), len(data), weight,
                      summed(classes) if classes else None)


def predicted_classes(model: torch.nn.Module, data: TokenizedData, batch_size: int,
                      device: torch.device) -> np.ndarray:
    """Each record's predicted class (argmax of its logits), in `data`'s order, batched
    as `evaluate_model` batches: the predictions its accuracy counts."""
    predicted = np.empty(len(data), dtype=np.int64)
    for indices, _, _, _, logits in _eval_batches(model, data, batch_size, device):
        predicted[indices] = logits.float().argmax(dim=-1).cpu().numpy()
    return predicted


@torch.no_grad()
def _eval_batches(model: torch.nn.Module, data: TokenizedData, batch_size: int,
                  device: torch.device) -> Iterator[tuple[list[int], torch.Tensor,
                                                          torch.Tensor, torch.Tensor | None,
                                                          torch.Tensor]]:
    """(indices, input ids, mask, labels, logits) per batch of records of similar length
    (less padding), dropout off; the model's train mode is restored after."""
    was_training = model.training
    model.eval()
    by_length = sorted(range(len(data)), key=data.length)
    try:
        for lo in range(0, len(data), batch_size):
            indices = by_length[lo:lo + batch_size]
            ids, mask, labels = data.batch(indices, device)
            with mixed_precision(device):
                yield indices, ids, mask, labels, model(ids, mask)
    finally:
        model.train(was_training)
