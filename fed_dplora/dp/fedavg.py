"""DP-FedAvg aggregation (client-level DP): clip each update, fixed denominator, noise.

Privacy (with `dp_fedavg_round` in `fed_dplora.privacy.events`): unit = all data of one
client. Each client's update (its returned tensors minus the global ones, every tensor
that travels, as one flat vector) is clipped to norm S; the clipped updates are summed,
N(0, (z S)^2) is added to every coordinate (also when no client was sampled) and the
sum is divided by the expected number of clients m, never by the number that answered.
The function reports the noise multiplier it used and how many updates it clipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fed_dplora.dp.noise import RandomSource


@dataclass(frozen=True)
class DpFedAvgStats:
    clients: int
    clipped: int
    noise_multiplier: float
    update_norms: tuple[float, ...]  # before clipping, in the order given

    @property
    def clip_fraction(self) -> float:
        return self.clipped / self.clients if self.clients else 0.0


def dp_fedavg(global_arrays: dict[str, np.ndarray], client_arrays: list[dict[str, np.ndarray]],
              clip_norm: float, noise_multiplier: float, expected_clients: int,
              rng: RandomSource) -> tuple[dict[str, np.ndarray], DpFedAvgStats]:
    """New global tensors: global + (sum of clipped updates + noise) / expected_clients."""
    if clip_norm <= 0 or noise_multiplier < 0 or expected_clients <= 0:
        raise ValueError(f"invalid DP-FedAvg settings: S={clip_norm}, z={noise_multiplier}, "
                         f"m={expected_clients}")
    names = sorted(global_arrays)
    for arrays in client_arrays:
        if sorted(arrays) != names:
            raise ValueError("a client returned different tensors than the server sent: "
                             f"{sorted(set(arrays) ^ set(names))}")
    base = _flat(global_arrays, names)
    total = torch.zeros_like(base)
    norms = []
    for arrays in client_arrays:
        update = _flat(arrays, names) - base
        norm = float(update.norm())
        norms.append(norm)
        total += update * min(1.0, clip_norm / max(norm, 1e-12))
    total += rng.normal(tuple(base.shape), noise_multiplier * clip_norm,
                        torch.device("cpu"), torch.float64)
    new = base + total / expected_clients
    stats = DpFedAvgStats(len(client_arrays), sum(n > clip_norm for n in norms),
                          noise_multiplier, tuple(norms))
    return _unflat(new, global_arrays, names), stats


def _flat(arrays: dict[str, np.ndarray], names: list[str]) -> torch.Tensor:
    return torch.cat([torch.from_numpy(np.asarray(arrays[n], dtype=np.float64)).reshape(-1)
                      for n in names])


def _unflat(flat: torch.Tensor, like: dict[str, np.ndarray], names: list[str]
            ) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name in names:
        size = like[name].size
        out[name] = flat[offset:offset + size].numpy().reshape(like[name].shape).astype(
            like[name].dtype)
        offset += size
    return out
