"""Weighted averaging of what travels, and the aggregation error vanilla LoRA incurs."""

from __future__ import annotations

import numpy as np


def weighted_mean(updates: list[dict[str, np.ndarray]], weights: list[float]
                  ) -> dict[str, np.ndarray]:
    """Per-tensor weighted mean; every update must carry the same keys."""
    keys = set(updates[0])
    for update in updates[1:]:
        if set(update) != keys:
            raise ValueError(f"updates carry different tensors: {sorted(keys ^ set(update))[:3]}")
    total = float(sum(weights))
    return {k: (sum(w * u[k].astype(np.float64) for u, w in zip(updates, weights))
                / total).astype(np.float32) for k in sorted(keys)}


def aggregation_error(updates: list[dict[str, np.ndarray]], weights: list[float],
                      shared: dict[str, np.ndarray]) -> float:
    """||mean_i(B_i A_i) - mean(B) mean(A)||_F / ||mean_i(B_i A_i)||_F over all LoRA pairs.

    `shared` holds tensors that do not travel (A under FFA), identical on every client;
    FFA's error is then 0 up to float rounding, computed the same way as vanilla's.
    """
    full = [{**shared, **u} for u in updates]
    w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    num = den = 0.0
    for a_name, b_name in lora_pairs(list(full[0])):
        products = sum(wi * (f[b_name].astype(np.float64) @ f[a_name].astype(np.float64))
                       for wi, f in zip(w, full))
        mean_b = sum(wi * f[b_name].astype(np.float64) for wi, f in zip(w, full))
        mean_a = sum(wi * f[a_name].astype(np.float64) for wi, f in zip(w, full))
        num += float(np.sum((products - mean_b @ mean_a) ** 2))
        den += float(np.sum(products ** 2))
    return (num ** 0.5) / (den ** 0.5) if den > 0 else 0.0


def lora_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(A name, B name) for every LoRA module among `names` that carries both."""
    present = set(names)
    return [(a, a.replace(".lora_A.", ".lora_B."))
            for a in sorted(present) if ".lora_A." in a
            and a.replace(".lora_A.", ".lora_B.") in present]
