"""Flower ClientApp: decode the message, call fed_dplora, encode the reply.

Per worker process, the model (with its Opacus hooks) is built once and the tokenized
data of each simulated client once; rounds reuse both.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_dplora import protocol as p
from fed_dplora.config import RunSpec, parse_run_config
from fed_dplora.data.site import SitePlacement, load_site
from fed_dplora.data.sources import sorted_label_names
from fed_dplora.data.tokenize import TokenizedData, tokenize
from fed_dplora.lora.model import ModelRecipe, load_tokenizer, resolve_device
from fed_dplora.train import LocalTrainer, RoundPlan

app = ClientApp()
EVAL_BATCH = 128


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Round 0: this client's stable site id, training-set size and label values."""
    placement = _placement(context)
    splits = _site(parse_run_config(context.run_config), placement)
    labels = sorted_label_names(set(splits.train.labels) | set(splits.test.labels))
    site = str(context.node_config.get("site-id", f"partition-{placement.partition_id}"))
    reply = ConfigRecord({p.SITE_ID: site, p.NUM_TRAIN_EXAMPLES: len(splits.train),
                          p.LABEL_NAMES: list(labels)})
    return Message(RecordDict({p.CONFIG: reply}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    spec = parse_run_config(context.run_config)
    config = _checked_config(msg)
    trainer, (train_data, _) = _prepare(spec, context, config)
    plan = RoundPlan(
        local_steps=spec.train.local_steps, batch_size=spec.train.batch_size,
        physical_batch_size=spec.train.physical_batch_size,
        learning_rate=spec.train.learning_rate, optimizer=spec.train.optimizer,
        noise_multiplier=config.get(p.NOISE_MULTIPLIER),
        max_grad_norm=spec.privacy.max_grad_norm, seed=int(config[p.ROUND_SEED]),
        # A site may insist on secure noise whatever the server asks.
        secure_noise=bool(config.get(p.SECURE_NOISE, False))
        or bool(context.node_config.get("secure-noise", False)))
    arrays, report = trainer.train(_to_numpy(msg.content[p.ARRAYS]), plan, train_data)
    metrics = MetricRecord({
        p.NUM_EXAMPLES: report.num_examples, p.STEPS: report.steps,
        p.SAMPLING_PROBABILITY: report.sampling_probability,
        p.NOISE_MULTIPLIER: report.noise_multiplier, p.TRAIN_LOSS: report.train_loss,
        p.CLIP_FRACTION: report.clip_fraction, p.COMPUTE_S: report.compute_s})
    content = RecordDict({p.ARRAYS: _to_record(arrays), p.METRICS: metrics,
                          p.CONFIG: ConfigRecord({p.A_FINGERPRINT: trainer.a_fingerprint()})})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    spec = parse_run_config(context.run_config)
    trainer, (_, test_data) = _prepare(spec, context, _checked_config(msg))
    report = trainer.evaluate(_to_numpy(msg.content[p.ARRAYS]), test_data, EVAL_BATCH)
    metrics = MetricRecord({p.EVAL_LOSS: report.loss, p.EVAL_ACCURACY: report.accuracy,
                            p.NUM_EXAMPLES: report.num_examples})
    return Message(RecordDict({p.METRICS: metrics}), reply_to=msg)


def _checked_config(msg: Message) -> ConfigRecord:
    config = msg.content[p.CONFIG]
    if config.get(p.WIRE) != p.WIRE_VERSION:
        raise ValueError(f"server speaks wire version {config.get(p.WIRE)}, this client "
                         f"{p.WIRE_VERSION}: install the same fed-dplora on both sides")
    return config


def _placement(context: Context) -> SitePlacement:
    node = context.node_config
    return SitePlacement(int(node.get("partition-id", 0)), int(node.get("num-partitions", 1)),
                         str(node.get("data-path", "")))


def _prepare(spec: RunSpec, context: Context, config: ConfigRecord
             ) -> tuple[LocalTrainer, tuple[TokenizedData, TokenizedData]]:
    labels = tuple(config[p.LABEL_NAMES])
    recipe = ModelRecipe.from_spec(spec, len(labels))
    trainer = _trainer(recipe, spec.device, spec.privacy.sample_level)
    return trainer, _tokenized(spec, _placement(context), labels)


@lru_cache(maxsize=1)
def _trainer(recipe: ModelRecipe, device: str, private: bool) -> LocalTrainer:
    return LocalTrainer(recipe, resolve_device(device), private)


@lru_cache(maxsize=64)
def _site(spec: RunSpec, placement: SitePlacement):
    return load_site(spec, placement)


@lru_cache(maxsize=64)
def _tokenized(spec: RunSpec, placement: SitePlacement, labels: tuple[str, ...]
               ) -> tuple[TokenizedData, TokenizedData]:
    tokenizer = load_tokenizer(spec.model)
    splits = _site(spec, placement)
    return (tokenize(splits.train, tokenizer, spec.model.max_length, labels),
            tokenize(splits.test, tokenizer, spec.model.max_length, labels))


def _to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array.from_numpy_ndarray(a) for name, a in arrays.items()})
