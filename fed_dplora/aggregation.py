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
                      aggregate: dict[str, np.ndarray] | None = None) -> float | None:
    """||mean_i(B_i R_i A_i) - B R A||_F / ||mean_i(B_i R_i A_i)||_F over all LoRA
    modules (R, Frozen-AB-R's, where there is one), where (B, R, A) is the `aggregate`
    released (default: the weighted means).

    `shared` holds tensors that did not travel (A under FFA, A and B under Frozen-AB-R, the
    held half of a RoLoRA round), identical on every client; the error of an exact
    method is then 0 up to float rounding, computed the same way as vanilla's. None
    where no module has both factors among them (FedSA: B never leaves the site).
    """
    full = [{**shared, **u} for u in updates]
    w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    released = None if aggregate is None else {**shared, **aggregate}
    chains = lora_chains(list(full[0]))
    if not chains:
        return None
    num = den = 0.0
    for chain in chains:
        products = sum(wi * _product(f, chain) for wi, f in zip(w, full))
        if released is None:  # the means, in float64
            released_chain = {n: sum(wi * f[n].astype(np.float64) for wi, f in zip(w, full))
                              for n in chain}
        else:
            released_chain = released
        num += float(np.sum((products - _product(released_chain, chain)) ** 2))
        den += float(np.sum(products ** 2))
    return (num ** 0.5) / (den ** 0.5) if den > 0 else 0.0


def _product(tensors: dict[str, np.ndarray], chain: tuple[str, ...]) -> np.ndarray:
    """B R A (or B A) in float64, `chain` naming them B first."""
    result = tensors[chain[0]].astype(np.float64)
    for name in chain[1:]:
        result = result @ tensors[name].astype(np.float64)
    return result


def lora_chains(names: list[str]) -> list[tuple[str, ...]]:
    """(B, R, A) or (B, A) names of every LoRA module among `names` that carries B and
    A; R is Frozen-AB-R's, inside A's module (`<A's module>.lora_R.weight`)."""
    present = set(names)
    chains = []
    for a in sorted(n for n in present if ".lora_A." in n and ".lora_R." not in n):
        b = a.replace(".lora_A.", ".lora_B.")
        r = a.removesuffix("weight") + "lora_R.weight"
        if b in present:
            chains.append((b, r, a) if r in present else (b, a))
    return chains
