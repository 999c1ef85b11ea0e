"""One model factory for server and clients: device, PEFT LoRA, FFA freeze, seeded init.

The task (`fed_dplora.tasks`) builds the frozen base model; this module puts it on its
device and adds LoRA. Order (enforced here, and checked by `dp.guards.check_on_device`
before each wrap): the base model is moved to its device first, PEFT wraps it there,
FFA freezes every `lora_A`, then `train()`. Opacus wraps the result later (`dp.engine`,
which checks the device again), never the other way round: wrapping first leaves the
optimizer or the hooks on stale parameter objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from fed_dplora.config import DEFAULT_MODEL, Device, LoraSpec, ModelSpec, RunSpec, TaskName
from fed_dplora.dp import guards
from fed_dplora.lora.offline_models import SMOLLM2, resolve_model_name
from fed_dplora.methods import method_for
from fed_dplora.tasks import task_for

# lora.target-modules="auto": LoRA on the attention's query and value projections.
DEFAULT_TARGETS = {
    "bert": ("query", "value"), "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"), "distilbert": ("q_lin", "v_lin"),
    "gpt2": ("c_attn",), "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"), "gemma": ("q_proj", "v_proj"),
}


class ModelError(ValueError):
    """A model name or path cannot be resolved or loaded."""


def resolve_device(device: Device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device=\"cuda\" but torch sees no CUDA device; use \"auto\" "
                         "or \"cpu\", or install a CUDA build of torch (README, GPU)")
    return torch.device(device)


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(_checked_source(spec.name))
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers
        if tokenizer.eos_token is None:
            raise ModelError(f"model.name={spec.name!r}: its tokenizer has neither a pad "
                             "nor an end-of-text token, and batches need one to pad with; "
                             "give a model whose tokenizer defines either")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _checked_source(name: str) -> str:
    """The resolved source; a path-like name must be an existing folder."""
    source = resolve_model_name(name)
    path = Path(source).expanduser()
    if (path.exists() or source.startswith((".", "/", "~"))) and not path.is_dir():
        raise ModelError(f"model.name={name!r}: no model folder at {source!r}; give a "
                         f"model folder, a hub id, or {DEFAULT_MODEL!r}")
    return str(path) if path.is_dir() else source


@dataclass(frozen=True)
class ModelRecipe:
    """Everything that determines the initial model, identical on server and clients."""

    model: ModelSpec
    lora: LoraSpec
    method: str  # a registered aggregation method (fed_dplora.methods)
    num_labels: int  # 0 for tasks without labels
    seed: int
    task: TaskName = "sequence-classification"

    @classmethod
    def from_spec(cls, spec: RunSpec, num_labels: int) -> "ModelRecipe":
        """The recipe of a run: the server and every client build from this."""
        return cls(spec.model, spec.lora, spec.method, num_labels, spec.seed, spec.task)


def build_base_model(recipe: ModelRecipe, device: torch.device) -> nn.Module:
    """The task's frozen base model (pretrained weights, seeded head), on `device`."""
    source = _checked_source(recipe.model.name)
    try:
        model = task_for(recipe.task).build_base(source, recipe.num_labels,
                                                 recipe.model.pooling, recipe.seed)
    except (OSError, ValueError) as err:
        raise ModelError(f"model.name={recipe.model.name!r}: cannot load {source!r} for "
                         f"task={recipe.task!r} ({err}); give a local model folder, a hub "
                         f"id reachable online, {DEFAULT_MODEL!r} or, for causal-lm, "
                         f"{SMOLLM2!r} or a .gguf file") from err
    return model.to(device)


def build_lora_model(recipe: ModelRecipe, device: torch.device) -> PeftModel:
    """Base on device -> PEFT LoRA -> the method's A (seeded; frozen under FFA) -> train()."""
    base = build_base_model(recipe, device)
    guards.check_on_device(base, device, "before PEFT wraps it")
    targets = lora_targets(base, recipe.lora)
    config = LoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha,
                        target_modules=list(targets), lora_dropout=0.0,
                        fan_in_fan_out=_targets_conv1d(base, targets),
                        modules_to_save=list(task_for(recipe.task).trained_modules) or None)
    try:
        model = get_peft_model(base, config)
    except ValueError as err:
        raise ModelError(f"lora.target-modules={','.join(targets)!r} does not fit "
                         f"{recipe.model.name!r}: {err}") from err
    method_for(recipe.method).prepare(model, recipe.seed)
    return model.train()


def lora_targets(base: nn.Module, lora: LoraSpec) -> tuple[str, ...]:
    """`lora.target-modules`, or for "auto" the default of the model's architecture."""
    if lora.target_modules:
        return lora.target_modules
    kinds = {getattr(m.config, "model_type", None) for m in base.modules()
             if hasattr(m, "config")} - {None}
    for kind in sorted(kinds):
        if kind in DEFAULT_TARGETS:
            return DEFAULT_TARGETS[kind]
    raise ModelError(f"lora.target-modules=\"auto\" has no default for model type(s) "
                     f"{sorted(kinds)} (known: {sorted(DEFAULT_TARGETS)}); name the modules, "
                     "e.g. lora.target-modules=\"q_proj,v_proj\"")


def _targets_conv1d(base: nn.Module, targets: tuple[str, ...]) -> bool:
    """GPT-2 style layers (transformers' Conv1D) store weights transposed: PEFT needs
    `fan_in_fan_out` for them."""
    return any(isinstance(module, Conv1D) and name.split(".")[-1] in targets
               for name, module in base.named_modules())


def load_adapter(recipe: ModelRecipe, adapter_dir: str | Path,
                 device: torch.device) -> PeftModel:
    """Rebuild the base model and load a saved adapter onto it with PEFT."""
    base = build_base_model(recipe, device)
    return PeftModel.from_pretrained(base, str(adapter_dir)).to(device).eval()
