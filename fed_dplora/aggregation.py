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


def capped_weights(weights: list[float], max_share: float) -> list[float]:
    """`weights` unchanged where no share passes `max_share`; otherwise shares with the
    largest fixed at the cap and the rest spread over the others in proportion
    (water-filling). Where k weights cannot all stay below the cap (max_share < 1/k):
    uniform."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must have a positive sum, got {weights}")
    shares = [w / total for w in weights]
    if max(shares) <= max_share:
        return list(weights)
    if max_share * len(shares) <= 1.0:
        return [1.0 / len(shares)] * len(shares)
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(shares)) if i not in capped]
        room = 1.0 - max_share * len(capped)
        mass = sum(weights[i] for i in free)
        shares = [max_share if i in capped else room * weights[i] / mass
                  for i in range(len(shares))]
        over = {i for i in free if shares[i] > max_share}
        if not over:
            return shares
        capped |= over


def aggregation_error(updates: list[dict[str, np.ndarray]], weights: list[float],
                      shared: dict[str, np.ndarray],
                      aggregate: dict[str, np.ndarray] | None = None) -> float:
    """||mean_i(B_i A_i) - B A||_F / ||mean_i(B_i A_i)||_F over all LoRA pairs, where
    (B, A) is the `aggregate` released (default: the weighted mean, mean(B) mean(A)).

    `shared` holds tensors that do not travel (A under FFA), identical on every client;
    FFA's error is then 0 up to float rounding for the mean, computed the same way as
    vanilla's.
    """
    full = [{**shared, **u} for u in updates]
    w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    released = None if aggregate is None else {**shared, **aggregate}
    num = den = 0.0
    for a_name, b_name in lora_pairs(list(full[0])):
        products = sum(wi * (f[b_name].astype(np.float64) @ f[a_name].astype(np.float64))
                       for wi, f in zip(w, full))
        if released is None:  # the mean, in float64
            b = sum(wi * f[b_name].astype(np.float64) for wi, f in zip(w, full))
            a = sum(wi * f[a_name].astype(np.float64) for wi, f in zip(w, full))
        else:
            b, a = (released[n].astype(np.float64) for n in (b_name, a_name))
        num += float(np.sum((products - b @ a) ** 2))
        den += float(np.sum(products ** 2))
    return (num ** 0.5) / (den ** 0.5) if den > 0 else 0.0


def lora_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(A name, B name) for every LoRA module among `names` that carries both."""
    present = set(names)
    return [(a, a.replace(".lora_A.", ".lora_B."))
            for a in sorted(present) if ".lora_A." in a
            and a.replace(".lora_A.", ".lora_B.") in present]
