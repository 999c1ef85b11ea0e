"""Adapter tensors <-> named float32 arrays: exactly what travels, and A's fingerprint.

What travels is defined by what trains: every parameter with `requires_grad` (LoRA `B`,
`A` under vanilla, the classifier head), never by attribute names. Under FFA `A` is
frozen (under Frozen-AB-R `A` and `B`), so it stays home and only its fingerprint is sent. A method that alternates
(RoLoRA) freezes a part of its global tensors in a round: that part is loaded (by
name), does not train, and does not travel back.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from fed_dplora.methods.base import LoraMethod, kind_of


class AdapterMismatchError(ValueError):
    """Received tensors do not match this model's trainable tensors."""


def trainable_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's trainable tensors as float32 CPU arrays, by parameter name."""
    return {name: param.detach().to("cpu", torch.float32).numpy().copy()
            for name, param in model.named_parameters() if param.requires_grad}


def global_arrays(model: nn.Module, method: LoraMethod) -> dict[str, np.ndarray]:
    """The tensors the server holds, sends and combines: what the model trains, less
    what the method keeps at each site (FedSA's B)."""
    arrays = trainable_arrays(model)
    names = method.global_names(arrays)
    return {name: array for name, array in arrays.items() if name in names}


def load_trainable_arrays(model: nn.Module, arrays: dict[str, np.ndarray],
                          names: set[str] | None = None) -> None:
    """Copy received arrays into the model's trainable tensors (or those `names`, the
    global ones of a method that trains a part of them in a round); key sets must match."""
    params = {name: p for name, p in model.named_parameters()
              if (p.requires_grad if names is None else name in names)}
    missing, extra = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
    if missing or extra:
        raise AdapterMismatchError(
            f"adapter keys differ from this model's trainable tensors: missing "
            f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
            f"{extra[:3]}{'...' if len(extra) > 3 else ''} (same method, model, "
            "lora.rank and lora.target-modules on both sides?)")
    with torch.no_grad():
        for name, param in params.items():
            value = torch.as_tensor(arrays[name])
            if tuple(value.shape) != tuple(param.shape):
                raise AdapterMismatchError(f"{name}: received shape {tuple(value.shape)}, "
                                           f"model has {tuple(param.shape)}")
            param.copy_(value.to(param.device, param.dtype))


def frozen_lora_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the frozen LoRA factors (`frozen_lora_factors`: names and float32
    bytes, in name order)."""
    digest = hashlib.sha256()
    for name, array in sorted(frozen_lora_factors(model).items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def frozen_lora_factors(model: nn.Module) -> dict[str, np.ndarray]:
    """The frozen LoRA A and B tensors (FFA's A; Frozen-AB-R's A and B), which stay home,
    as float32 CPU arrays."""
    return {name: param.detach().to("cpu", torch.float32).numpy().copy()
            for name, param in model.named_parameters()
            if kind_of(name) in ("A", "B") and not param.requires_grad}
