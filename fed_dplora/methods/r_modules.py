"""Frozen-AB-R's torch half: an r x r matrix R between each frozen A and B, and its folding
into a standard PEFT adapter (A' = R A) for saving. Imported only where a model is built
(the strategies read a method's rounds without torch)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn


class SbDown(nn.Module):
    """x -> R (A x): PEFT's frozen `lora_A` (its parameter kept, under the same name)
    followed by the trainable `lora_R`, zero at the start (the model starts as the
    base model, as LoRA's B = 0 does)."""

    def __init__(self, down: nn.Linear) -> None:
        super().__init__()
        self.weight = down.weight
        rank = down.weight.shape[0]
        self.lora_R = nn.Linear(rank, rank, bias=False, device=down.weight.device,
                                dtype=down.weight.dtype)
        nn.init.zeros_(self.lora_R.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_R(F.linear(x, self.weight))


def insert_r(model: nn.Module) -> None:
    """Put an R after every LoRA A of the model."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for key in list(module.lora_A.keys()):
                module.lora_A[key] = SbDown(module.lora_A[key])


def folded(model: nn.Module) -> nn.Module:
    """A copy whose every A is R A and R is gone: a standard LoRA adapter with the same
    B R A, which PEFT saves and loads (`fed_dplora.lora.model.load_adapter`)."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, LoraLayer):
            for key, down in list(module.lora_A.items()):
                if isinstance(down, SbDown):
                    rank, width = down.weight.shape
                    linear = nn.Linear(width, rank, bias=False, device=down.weight.device,
                                       dtype=down.weight.dtype)
                    with torch.no_grad():
                        linear.weight.copy_(down.lora_R.weight @ down.weight)
                    module.lora_A[key] = linear
    return plain
