"""Guards against the silent failures of DP-LoRA. Each raises with an explanation.

The published failure these exist for: Opacus updated stale copies of the LoRA
parameters while the model's own weights never moved; loss and epsilon looked normal.
"""

from __future__ import annotations

import torch
from torch import nn


class GuardError(RuntimeError):
    """A precondition of private training does not hold."""


class CoverageError(GuardError):
    """A trainable tensor would be updated without per-sample clipping and noise."""


class NonFiniteGradient(GuardError):
    """A per-sample gradient holds a NaN or inf, which clipping cannot bound."""


def check_on_device(model: nn.Module, device: torch.device, stage: str) -> None:
    """Every parameter and buffer sits on `device` at `stage`. Called before PEFT wraps
    the base and before Opacus wraps the PEFT model, so the order (device, then PEFT,
    then Opacus) is checked, not only the final placement: a model moved afterwards
    can leave hooks or the optimizer on stale parameter objects. The whole device is
    compared (cuda:1 is not cuda:0); a device without an index means the current one."""
    expected = _indexed(device)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if _indexed(tensor.device) != expected:
            raise GuardError(f"{name} is on {tensor.device}, expected {device} {stage}: "
                             "place the base model on its device first, then wrap it "
                             "with PEFT, then with Opacus (fed_dplora.lora.model)")


def _indexed(device: torch.device) -> torch.device:
    """`device` with its index: "cuda" is the current CUDA device (as `.to` places it)."""
    if device.index is not None or device.type == "cpu":
        return device
    module = getattr(torch, device.type, None)
    return torch.device(device.type, module.current_device()) if module else device


def check_supported_by_opacus(model: nn.Module) -> None:
    """No module that owns a trainable tensor is one Opacus cannot privatize (BatchNorm,
    which mixes samples, for example). Frozen modules are left alone."""
    from opacus.validators import ModuleValidator  # Opacus only where DP training runs
    errors = [f"{name}: {error}" for name, module in model.named_modules()
              if any(p.requires_grad for p in module.parameters(recurse=False))
              for error in ModuleValidator.validate(module, strict=False)]
    if errors:
        raise CoverageError("trainable modules Opacus cannot privatize: " + "; ".join(errors))


def check_optimizer_holds_model_params(optimizer: torch.optim.Optimizer,
                                       model: nn.Module) -> None:
    """The optimizer updates the very parameter objects the model trains, and no others."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    if held != set(trainable):
        missing = [n for i, n in trainable.items() if i not in held]
        raise GuardError(
            f"the optimizer does not hold the model's trainable parameters (missing "
            f"{missing[:3]}, {len(held - set(trainable))} foreign tensors): it would "
            "update stale copies while the model never moves. Build the optimizer from "
            "the final wrapped model's parameters.")


def frozen_checksum(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Float64 sum and sum of squares of every frozen parameter (cheap, on device)."""
    with torch.no_grad():
        return {n: (float(p.double().sum()), float(p.double().pow(2).sum()))
                for n, p in model.named_parameters() if not p.requires_grad}


def snapshot_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def check_update_applied(model: nn.Module, before: dict[str, torch.Tensor],
                         frozen_before: dict[str, tuple[float, float]]) -> None:
    """After a step: every trainable tensor with a non-zero gradient moved, and no
    frozen tensor (the base model, `A` under FFA) did."""
    stuck = [n for n, p in model.named_parameters()
             if n in before and p.grad is not None and bool(p.grad.any())
             and torch.equal(p.detach(), before[n])]
    if stuck:
        raise GuardError(
            f"{len(stuck)} trainable tensors have a non-zero gradient but did not move "
            f"(e.g. {stuck[0]}): the optimizer is updating other objects than the "
            "model's parameters (stale copies), so training does nothing while loss "
            "and epsilon look normal.")
    moved = [n for n, sums in frozen_checksum(model).items() if sums != frozen_before[n]]
    if moved:
        raise GuardError(f"frozen tensors changed during a step (e.g. {moved[0]}): "
                         "they would train without DP and outside the adapter")


def check_signal(signal_norm: float, examples: int) -> None:
    """The clipped gradient before noise is non-zero (noise alone also moves weights)."""
    if examples > 0 and not signal_norm > 0.0:
        raise GuardError(
            f"the clipped gradient signal of {examples} examples is zero before noise: "
            "weights would move by noise alone. Check that the loss depends on the "
            "trainable tensors and that per-sample gradients are populated.")
