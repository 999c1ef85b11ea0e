"""The heavy half of the ClientApp: this site's data, tokenized, and its trainer.

Per worker process, the model (with its Opacus hooks) is built once and the tokenized
data of each simulated client once; rounds reuse both. Imports torch, transformers, PEFT
and Opacus, so `client_app` loads this module only where training happens (see there).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from fed_dplora.config import ModelSpec, RunSpec
from fed_dplora.data.site import SITES_CACHED, SitePlacement
from fed_dplora.data.sources import LabelledText
from fed_dplora.data.tokenize import TokenizedData, tokenize
from fed_dplora.lora.model import ModelRecipe, load_tokenizer, resolve_device
from fed_dplora.refusals import check_noise_multiplier
from fed_dplora.site.trainer import LocalTrainer, RoundPlan
from fed_dplora.tasks import uses_labels
from strategies import wire as p

# The probe batch's one text (no record's): long enough to fill any model.max-length.
PROBE_TEXT = " ".join(["the patient was seen and the note was written"] * 256)


def prepare(spec: RunSpec, placement: SitePlacement, splits, labels: tuple[str, ...]
            ) -> tuple[LocalTrainer, tuple[TokenizedData, TokenizedData, TokenizedData | None]]:
    """The reused trainer and this site's (train, test, validation or None) data,
    tokenized once."""
    recipe = ModelRecipe.from_spec(spec, len(labels))
    trainer = _trainer(recipe, spec.device, spec.privacy.sample_level)
    return trainer, _tokenized(spec, placement, labels, splits)


def check_device(spec: RunSpec) -> None:
    """The run's device exists here (raises ModelError naming the key if not)."""
    resolve_device(spec.device)


def round_plan(spec: RunSpec, config: Mapping, fresh_randomness: bool) -> RoundPlan:
    """This round's plan from the run config and the server's round config (a noise
    multiplier that is not a finite number >= 0 is a `PublicRefusal`)."""
    return RoundPlan(
        local_steps=spec.train.local_steps, batch_size=spec.train.batch_size,
        physical_batch_size=spec.train.physical_batch_size,
        learning_rate=spec.train.learning_rate, optimizer=spec.train.optimizer,
        noise_multiplier=check_noise_multiplier(config.get(p.NOISE_MULTIPLIER)),
        max_grad_norm=spec.privacy.max_grad_norm, seed=int(config[p.ROUND_SEED]),
        secure_noise=fresh_randomness, server_round=int(config.get(p.ROUND, 1)))


def probe_data(spec: RunSpec, labels: tuple[str, ...]) -> TokenizedData:
    """A deployed site's probe batch (`LocalTrainer.probe`): public records of the run's
    shape, one fixed text truncated to `model.max-length` tokens, one record per label
    name (at least two), so that no choice of tensors zeroes every record's gradient."""
    names = labels if uses_labels(spec.task) else None
    count = max(2, len(labels))
    probe_labels = tuple(labels[i % len(labels)] if names else "" for i in range(count))
    records = LabelledText((PROBE_TEXT,) * count, probe_labels)
    return tokenize(records, _tokenizer(spec.model), spec.model.max_length, names)


@lru_cache(maxsize=1)
def _trainer(recipe: ModelRecipe, device: str, private: bool) -> LocalTrainer:
    return LocalTrainer(recipe, resolve_device(device), private)


@lru_cache(maxsize=4)
def _tokenizer(model: ModelSpec) -> PreTrainedTokenizerBase:
    """One tokenizer per model and process: loading it (about 50 ms for MiniLM) was most
    of what a site's first visit to a worker cost (1,000 simulated sites: every visit)."""
    return load_tokenizer(model)


@lru_cache(maxsize=SITES_CACHED)
def _tokenized(spec: RunSpec, placement: SitePlacement, labels: tuple[str, ...], splits
               ) -> tuple[TokenizedData, TokenizedData, TokenizedData | None]:
    tokenizer = _tokenizer(spec.model)
    names = labels if uses_labels(spec.task) else None
    return tuple(None if part is None else
                 tokenize(part, tokenizer, spec.model.max_length, names)
                 for part in (splits.train, splits.test, splits.validation))
