"""Values that depend only on (run seed, tensor name): bit-identical on every party."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn


def seeded_uniform(shape: torch.Size, seed: int, name: str) -> torch.Tensor:
    """U(-1, 1) from (seed, name) alone, drawn on CPU in float32."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1


def seed_lora_a(model: nn.Module, seed: int, trainable: bool) -> None:
    """Set every `lora_A` from the run seed (PEFT's default distribution), on CPU first.

    The values depend only on the seed and the parameter name, so every client and the
    server hold bit-identical A on any device. FFA passes `trainable=False`.
    """
    _seed_factor(model, seed, ".lora_A.", trainable)


def seed_lora_b(model: nn.Module, seed: int) -> None:
    """Set every `lora_B` from the run seed, frozen (Frozen-AB-R: B stays at its init), with
    the same rule as A: U(-1, 1) / sqrt(fan-in), fan-in being the rank."""
    _seed_factor(model, seed, ".lora_B.", trainable=False)


def _seed_factor(model: nn.Module, seed: int, marker: str, trainable: bool) -> None:
    """U(-1, 1) / sqrt(fan-in) from (seed, name) for every parameter named with `marker`."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if marker in name:
                bound = 1.0 / math.sqrt(param.shape[1])
                param.copy_(seeded_uniform(param.shape, seed, name) * bound)
                param.requires_grad_(trainable)
