"""Randomness for the DP mechanisms: seeded (reproducible simulation) or secure.

Sampling and noise are the mechanism: if an observer can predict them, subsampling
amplifies nothing and the noise can be subtracted. A seeded source is for simulation
only, where one trusted process plays every party. `SecureRandom` draws from the
operating system's CSPRNG (`os.urandom`) and, like Opacus' secure mode, returns each
Gaussian value as the sum of four independent draws divided by two, a defence against
floating-point attacks on single Gaussian samples (Mironov, CCS 2012).
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np
import torch


class RandomSource(Protocol):
    secure: bool

    def uniform(self, n: int) -> torch.Tensor:
        """`n` values uniform in (0, 1), on CPU."""

    def normal(self, shape: tuple[int, ...], std: float, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
        """N(0, std^2) values of `shape`."""


class SeededRandom:
    """torch's generator from a seed: reproducible, and predictable by whoever knows it."""

    secure = False

    def __init__(self, seed: int, device: torch.device = torch.device("cpu")) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._cpu = torch.Generator().manual_seed(seed)

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self._cpu)

    def normal(self, shape, std, device, dtype) -> torch.Tensor:
        return torch.normal(0.0, std, size=tuple(shape), generator=self.generator,
                            device=self.device).to(device, dtype)


class SecureRandom:
    """The OS CSPRNG; nothing about its output can be derived from a run's config."""

    secure = True

    def uniform(self, n: int) -> torch.Tensor:
        raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        # 53 random bits -> (0, 1]: never 0, so log() below is finite.
        return torch.from_numpy((raw.astype(np.float64) + 1.0) * 2.0 ** -53)

    def normal(self, shape, std, device, dtype) -> torch.Tensor:
        n = math.prod(shape)
        total = torch.zeros(n, dtype=torch.float64)
        for _ in range(4):
            radius = torch.sqrt(-2.0 * torch.log(self.uniform(n)))
            total += radius * torch.cos(2.0 * math.pi * self.uniform(n))
        return (total * (std / 2.0)).reshape(tuple(shape)).to(device, dtype)


def random_source(secure: bool, seed: int, device: torch.device = torch.device("cpu")
                  ) -> RandomSource:
    return SecureRandom() if secure else SeededRandom(seed, device)
