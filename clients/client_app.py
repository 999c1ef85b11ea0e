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

import functools
import importlib
import logging
from collections.abc import Callable
from functools import lru_cache
from types import ModuleType

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import runtime
from fed_dplora.config import ConfigError, RunSpec, parse_run_config
from fed_dplora.data.site import (
    SITES_CACHED,
    DataSource,
    SitePlacement,
    data_source,
    load_site,
    shareable_labels,
)
from fed_dplora.data.sources import Splits
from fed_dplora.methods import method_for
from fed_dplora.ops.memory import release_freed_memory
from fed_dplora.refusals import PublicRefusal, ReleaseWithheld, check_message_arrays
from fed_dplora.tasks import uses_labels
from strategies import wire as p
from strategies.wire import to_arrays, to_record

app = ClientApp()
EVAL_BATCH = 128
LOCAL_SITE = "clients.local_site"
log = logging.getLogger("fed_dplora.client")


def _site_errors(handler: Callable[[Message, Context], Message]):
    """A `PublicRefusal` leaves with its text (a function of public inputs only), and
    so does `ReleaseWithheld` (one text whatever fired).
    Unless the site shares everything, any other error leaves the site as its type
    alone: its text could quote a record. The full error goes to the site's own log.
    After each message the memory it freed goes back to the OS (a worker serves many
    sites)."""
    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except (PublicRefusal, ReleaseWithheld) as why:  # texts that may leave
            log.warning("%s refused: %s", handler.__name__, why)
            raise RuntimeError(f"{type(why).__name__}: {why}") from None
        except Exception as exc:
            mode = runtime.share_metrics(context.node_config)
            if mode == p.SHARE_ALL:
                raise
            log.exception("%s failed at this site", handler.__name__)
            raise RuntimeError(f"{type(exc).__name__} at this site (details in the "
                               f"site's log; {p.SHARE_METRICS}={mode})") from None
        finally:
            release_freed_memory()
    return guarded


@app.query()
@_site_errors
def query(msg: Message, context: Context) -> Message:
    """Round 0: this client's stable site id, training-set size, label values (those it
    declared, or found if they look like labels), how it will draw its DP randomness
    (the server's write-ahead record needs it) and, where it shares evaluation, the
    sizes of its test and validation splits."""
    placement = runtime.placement(context.node_config)
    spec = _run_spec(context)
    if spec.device == "cuda":  # fail before training; "auto" stays light (no torch here)
        _local_site().check_device(spec)
    splits = _site(spec, placement)
    mode = runtime.share_metrics(context.node_config)
    labels, trained = _census_labels(spec, splits, context, mode)
    reply = ConfigRecord({p.SITE_ID: _site_name(context), p.NUM_TRAIN_EXAMPLES: len(splits.train),
                          p.LABEL_NAMES: list(labels),
                          p.RANDOMNESS: _randomness(msg.content[p.CONFIG], context),
                          p.SHARE_METRICS: mode})
    if trained is not None:
        reply[p.TRAIN_LABEL_NAMES] = list(trained)
    if mode != p.SHARE_DP_ONLY:  # what its evaluation replies' sizes must be
        reply[p.NUM_TEST_EXAMPLES] = len(splits.test)
        if splits.validation is not None:
            reply[p.NUM_VALIDATION_EXAMPLES] = len(splits.validation)
    return Message(RecordDict({p.CONFIG: reply}), reply_to=msg)


def _census_labels(spec: RunSpec, splits: Splits, context: Context, mode: str
                   ) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """(label names to share, its training split's labels or None): only values that
    look like labels, or the site's declared set (a deployed site shares declared
    labels only); a `dp-only` site keeps which of them its training split holds to
    itself."""
    if not uses_labels(spec.task):
        return (), ()
    declared = runtime.declared_labels(context.node_config)
    if not declared and not runtime.in_simulation():
        raise PublicRefusal("this deployed site declares no labels (node config "
                            "labels=\"a,b,...\"): it shares label values it declared only")
    found = set(splits.train.labels) | set(splits.test.labels)
    labels = shareable_labels(found, declared)
    trained = tuple(sorted(set(splits.train.labels)))
    return labels, None if mode == p.SHARE_DP_ONLY else trained


@app.train()
@_site_errors
def train(msg: Message, context: Context) -> Message:
    """Train, or decline: by the site's own limits, or for a public reason (a
    `PublicRefusal`, before anything is charged)."""
    try:
        return _train(msg, context)
    except PublicRefusal as why:
        log.warning("declining a round of run %s: %s", context.run_id, why)
        return _declined(msg, f"{type(why).__name__}: {why}")


def _train(msg: Message, context: Context) -> Message:
    """Public checks (config, round plan and a deployed site's work caps, tensors, its
    probe), then the site ledger's charge, then the private steps (a deployed site's
    stop when its task is revoked or past its wall-time cap)."""
    spec = _run_spec(context)
    config = _checked_config(msg)
    fresh = _randomness(config, context) == p.FRESH  # the site decides, not the server
    plan = _local_site().round_plan(spec, config, fresh)
    deployed = not runtime.in_simulation()
    stop = _work_stop(context, plan) if deployed else None
    sent = to_arrays(msg.content[p.ARRAYS])
    check_message_arrays(sent)
    trainer, (train_data, _, _) = _prepare(spec, context, config)
    own = _own_state(spec, context, config)
    kept = own.load(plan.server_round) if own else None
    if deployed:
        trainer.probe(sent, plan, _local_site().probe_data(spec, tuple(config[p.LABEL_NAMES])),
                      kept)
        stop()  # past its cap already: nothing charged
    declined = _site_declines(spec, context, plan)
    if declined:
        return _declined(msg, declined)
    arrays, report = trainer.train(sent, plan, train_data, kept, withhold=deployed, stop=stop)
    if own:
        own.save(plan.server_round, trainer.local_arrays())
    return Message(RecordDict({
        p.ARRAYS: to_record(arrays), p.METRICS: _train_metrics(report, context),
        p.CONFIG: ConfigRecord({p.A_FINGERPRINT: trainer.a_fingerprint()})}), reply_to=msg)


def _work_stop(context: Context, plan) -> Callable[[], None]:
    """The site's work caps on this round's plan (`WorkRefused`), and the check its
    steps call (`WorkStopped` once the task is revoked or past `max-task-seconds`)."""
    limits = runtime.work_limits(context.node_config)
    limits.check(plan.local_steps, plan.batch_size)
    return limits.stop_check(runtime.task_revoked)


def _train_metrics(report, context: Context) -> MetricRecord:
    """What the accountant needs (n: the census sent it already); more under "all"."""
    metrics = MetricRecord({
        p.NUM_EXAMPLES: report.num_examples, p.STEPS: report.steps,
        p.SAMPLING_PROBABILITY: report.sampling_probability,
        p.NOISE_MULTIPLIER: report.noise_multiplier})
    if runtime.share_metrics(context.node_config) == p.SHARE_ALL:
        metrics.update({p.TRAIN_LOSS: report.train_loss, p.CLIP_FRACTION: report.clip_fraction,
                        p.COMPUTE_S: report.compute_s})
    return metrics


def _declined(msg: Message, reason: str) -> Message:
    return Message(RecordDict({p.CONFIG: ConfigRecord({p.DECLINED: reason})}), reply_to=msg)


@app.evaluate()
@_site_errors
def evaluate(msg: Message, context: Context) -> Message:
    if runtime.share_metrics(context.node_config) == p.SHARE_DP_ONLY:
        raise PublicRefusal(f"this site shares no evaluation metrics ({p.SHARE_METRICS}="
                            f"{p.SHARE_DP_ONLY!r} in its node config)")
    spec = _run_spec(context)
    config = _checked_config(msg)
    arrays = to_arrays(msg.content[p.ARRAYS])
    check_message_arrays(arrays)
    trainer, splits = _prepare(spec, context, config)
    metrics = MetricRecord(_split_metrics(trainer, arrays, splits, None, ""))
    own = _own_state(spec, context, config)
    if own:  # and under the site's own tensors, as it left them this round
        kept = own.load(int(config.get(p.ROUND, 0)) + 1)
        metrics.update(_split_metrics(trainer, arrays, splits, kept, p.PERSONAL))
    return Message(RecordDict({p.METRICS: metrics}), reply_to=msg)


def _split_metrics(trainer, arrays, splits, kept, prefix: str) -> dict:
    """Test (and validation, where the site has it) metrics, keys under `prefix`."""
    _, test_data, validation = splits
    metrics = _eval_metrics(trainer.evaluate(arrays, test_data, EVAL_BATCH, kept), prefix)
    if validation is not None:
        metrics.update(_eval_metrics(trainer.evaluate(arrays, validation, EVAL_BATCH, kept),
                                     prefix + p.VALIDATION))
    return metrics


def _eval_metrics(report, prefix: str = "") -> dict:
    """An evaluation's reply metrics (keys prefixed for the validation split)."""
    metrics = {p.EVAL_LOSS: report.loss, p.EVAL_ACCURACY: report.accuracy,
               p.NUM_EXAMPLES: report.num_examples, p.EVAL_WEIGHT: report.weight}
    if report.classes is not None:
        metrics.update({p.EVAL_CLASS_TRUE: list(report.classes.true),
                        p.EVAL_CLASS_PREDICTED: list(report.classes.predicted),
                        p.EVAL_CLASS_CORRECT: list(report.classes.correct)})
    return {prefix + key: value for key, value in metrics.items()}


def _run_spec(context: Context) -> RunSpec:
    """The run config, parsed; a bad one is a `PublicRefusal` (its text names a key).
    A deployed site loads only the models its node config allows, and nothing from the
    hub unless it allows that too."""
    try:
        spec = parse_run_config(context.run_config)
    except ConfigError as err:
        raise PublicRefusal(f"the run config is invalid: {err}") from None
    if not runtime.in_simulation():
        runtime.keep_hub_offline(context.node_config)
        if spec.model.name not in runtime.allowed_models(context.node_config):
            raise PublicRefusal(f"model.name={spec.model.name!r} is not on this site's "
                                "allow-list (its node config's models)")
    return spec


def _checked_config(msg: Message) -> ConfigRecord:
    config = msg.content[p.CONFIG]
    if config.get(p.WIRE) != p.WIRE_VERSION:
        raise PublicRefusal(f"server speaks wire version {config.get(p.WIRE)}, this client "
                         f"{p.WIRE_VERSION}: install the same fed-dplora on both sides")
    return config


def _site_declines(spec: RunSpec, context: Context, plan) -> str | None:
    """Charge the round to the site's own ledger, or say why it declines (a `dp-only`
    site says only that it declines: its reasons quote its lifetime spend and limits)."""
    ledger = runtime.site_ledger(context.node_config)
    if ledger is None:
        return None
    from fed_dplora.privacy.events import sampling_probability
    from fed_dplora.site.ledger import RoundAsk, SiteDeclines
    placement = runtime.placement(context.node_config)
    splits = _site(spec, placement)
    ask = RoundAsk(str(context.run_id), sampling_probability(plan.batch_size,
                                                                 len(splits.train)),
                   plan.noise_multiplier, plan.local_steps)
    try:
        spend = ledger.charge_or_decline(_source(spec, placement), ask)
    except SiteDeclines as why:
        log.warning("declining a round of run %s: %s", ask.run, why)
        shared = runtime.share_metrics(context.node_config) != p.SHARE_DP_ONLY
        return str(why) if shared else p.DECLINED_WITHHELD
    log.info("site ledger %s: epsilon %.4f replace-one, %.4f add/remove (delta %.3g) "
             "after this round", ledger.path, spend.replace_one, spend.add_remove, spend.delta)
    return None


def _site_name(context: Context) -> str:
    placement = runtime.placement(context.node_config)
    return str(context.node_config.get("site-id", f"partition-{placement.partition_id}"))


def _own_state(spec: RunSpec, context: Context, config: ConfigRecord):
    """Where this site keeps its own tensors of the run (`fed_dplora.site.state`), for
    a method that has them; None otherwise."""
    if not method_for(spec.method).local:
        return None
    from fed_dplora.site.state import SiteState
    return SiteState(runtime.site_state_root(context.node_config),
                     str(config.get(p.RUN_KEY, "")), _site_name(context))


def _randomness(config: ConfigRecord, context: Context) -> str:
    return runtime.randomness(context.node_config, bool(config.get(p.SECURE_NOISE, False)))


def _prepare(spec: RunSpec, context: Context, config: ConfigRecord):
    placement = runtime.placement(context.node_config)
    label_names, splits = tuple(config[p.LABEL_NAMES]), _site(spec, placement)
    if uses_labels(spec.task) and not runtime.in_simulation():
        _check_declared_labels(context, label_names, splits)
    return _local_site().prepare(spec, placement, splits, label_names)


def _check_declared_labels(context: Context, label_names: tuple[str, ...],
                           splits: Splits) -> None:
    """A deployed site's records carry only labels it declared, and a message must name
    all of them: otherwise whether its data failed to tokenize would tell which labels
    its records hold. Both refusals depend on no message-chosen record."""
    declared = set(runtime.declared_labels(context.node_config))
    held = {label for split in (splits.train, splits.validation, splits.test)
            if split is not None for label in split.labels}
    if not held <= declared:
        raise PublicRefusal("this site's data holds labels its node config does not "
                            "declare (labels=\"a,b,...\" must list every label it holds)")
    missing = sorted(declared - set(label_names))
    if missing:
        raise PublicRefusal(f"the message's label names leave out {missing}, which this "
                            "site declares (node config labels): it works only with all of them")


def _local_site() -> ModuleType:
    return importlib.import_module(LOCAL_SITE)


@lru_cache(maxsize=SITES_CACHED)
def _site(spec: RunSpec, placement: SitePlacement) -> Splits:
    return load_site(spec, placement)


@lru_cache(maxsize=SITES_CACHED)
def _source(spec: RunSpec, placement: SitePlacement) -> DataSource:
    """The site's ledger account (hashing its files once per process)."""
    return data_source(spec, placement, _site(spec, placement))

