"""Flower ClientApp: decode the message, call fed_dplora, encode the reply.

Start-up: Flower imports this module in the simulation driver (to check it loads)
before Ray starts, then in every worker. So it imports only Flower and light parts; the
census loads just the site's data, and the training half (`clients.local_site`: torch,
transformers, PEFT, Opacus) is imported on the first train or evaluate message. Not in
a background thread: a simulated worker loads the next client's data (flwr-datasets,
which inspects transformers) right after, and concurrent imports of one package can
leave it half-initialized.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from types import ModuleType

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_dplora import protocol as p
from fed_dplora.config import RunSpec, parse_run_config
from fed_dplora.data.site import SITES_CACHED, SitePlacement, load_site
from fed_dplora.data.sources import Splits, sorted_label_names
from strategies.codec import to_arrays, to_record

app = ClientApp()
EVAL_BATCH = 128
LOCAL_SITE = "clients.local_site"


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
    # A site may insist on secure noise whatever the server asks.
    plan = _local_site().round_plan(
        spec, config, bool(context.node_config.get("secure-noise", False)))
    arrays, report = trainer.train(to_arrays(msg.content[p.ARRAYS]), plan, train_data)
    metrics = MetricRecord({
        p.NUM_EXAMPLES: report.num_examples, p.STEPS: report.steps,
        p.SAMPLING_PROBABILITY: report.sampling_probability,
        p.NOISE_MULTIPLIER: report.noise_multiplier, p.TRAIN_LOSS: report.train_loss,
        p.CLIP_FRACTION: report.clip_fraction, p.COMPUTE_S: report.compute_s})
    content = RecordDict({p.ARRAYS: to_record(arrays), p.METRICS: metrics,
                          p.CONFIG: ConfigRecord({p.A_FINGERPRINT: trainer.a_fingerprint()})})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    spec = parse_run_config(context.run_config)
    trainer, (_, test_data) = _prepare(spec, context, _checked_config(msg))
    report = trainer.evaluate(to_arrays(msg.content[p.ARRAYS]), test_data, EVAL_BATCH)
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


def _prepare(spec: RunSpec, context: Context, config: ConfigRecord):
    placement = _placement(context)
    return _local_site().prepare(spec, placement, _site(spec, placement),
                                 tuple(config[p.LABEL_NAMES]))


def _local_site() -> ModuleType:
    return importlib.import_module(LOCAL_SITE)


@lru_cache(maxsize=SITES_CACHED)
def _site(spec: RunSpec, placement: SitePlacement) -> Splits:
    return load_site(spec, placement)

