"""A site's own policies, decided in the client's process, never taken from the server:
where it runs (Flower's simulation or a deployment), how it draws its DP randomness,
and what it shares besides the DP tensors.

Flower's simulation runs every ClientApp inside a Ray actor of its class
`ClientAppActor`; a deployed SuperNode runs it in its own `flwr-clientapp` process,
never inside Ray. A client outside the simulation draws its DP sampling and noise from
the OS CSPRNG whatever the server asks (see `randomness`).
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from fed_dplora.config.specs import DEFAULT_MODEL
from fed_dplora.data.site import OwnSplit, SitePlacement
from fed_dplora.data.sources import DataError
from fed_dplora.site.limits import (DEFAULT_MAX_EPSILON, DEFAULT_MAX_ROUNDS,
                                    DEFAULT_MAX_RUN_EPSILON, SiteLimits, WorkLimits)
from strategies.wire import (
    FRESH,
    SEEDED,
    SEEDED_BY_SITE,
    SHARE_ALL,
    SHARE_DP_ONLY,
    SHARE_METRICS,
    SHARE_MODES,
)

SIMULATION_ACTOR_MODULE = "flwr.simulation.ray_transport.ray_actor"


def in_simulation() -> bool:
    """True inside Flower's simulation runtime (a Ray `ClientAppActor`)."""
    if SIMULATION_ACTOR_MODULE not in sys.modules or "ray" not in sys.modules:
        return False
    import ray
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def randomness(node_config: Mapping, server_asks_secure: bool) -> str:
    """This site's mode: outside the simulation always fresh, unless the site itself set
    `--node-config 'secure-noise=false'`; inside it, seeded unless the server asks for
    secure noise or the node config sets `secure-noise=true`."""
    own = node_config.get("secure-noise")
    if not in_simulation():
        return SEEDED_BY_SITE if own is False else FRESH
    return FRESH if server_asks_secure or own is True else SEEDED


def share_metrics(node_config: Mapping) -> str:
    """`--node-config 'share-metrics="..."'`: "all" (the simulation's default),
    "evaluation" (DP tensors, the accountant's inputs and evaluation metrics) or
    "dp-only" (a deployment's default: DP tensors and the accountant's inputs)."""
    mode = node_config.get(SHARE_METRICS)
    if mode is None:
        return SHARE_ALL if in_simulation() else SHARE_DP_ONLY
    if mode not in SHARE_MODES:
        raise ValueError(f"node config {SHARE_METRICS}={mode!r}: valid values are "
                         f"{list(SHARE_MODES)}")
    return mode


def site_ledger(node_config: Mapping):
    """The site's own ledger (node config `privacy-ledger`, a file path), with its limits
    (`site_limits`). On by default outside the simulation, at
    $FLWR_HOME/fed-dplora/site-ledger.json (flwr has no SuperNode state folder); inside
    it only where `privacy-ledger` is given (a sweep would exhaust it). Returns a
    `fed_dplora.site.ledger.SiteLedger`, or None."""
    path = node_config.get("privacy-ledger")
    if not path:
        if in_simulation():
            return None
        path = _own_folder() / "site-ledger.json"
    from fed_dplora.site.ledger import SiteLedger  # dp-accounting
    return SiteLedger(path, site_limits(node_config))


def site_limits(node_config: Mapping) -> SiteLimits:
    """`max-epsilon` (lifetime), `max-run-epsilon`, `max-delta`, `min-noise-multiplier`,
    `allow-unnoised`, `max-rounds`. A deployed site's defaults are
    `fed_dplora.site.limits`'; a simulated one has none. An epsilon limit may be `inf`
    only where the site allows un-noised rounds."""
    unnoised = allows_unnoised(node_config)
    rounds = node_config.get("max-rounds", None if in_simulation() else DEFAULT_MAX_ROUNDS)
    return SiteLimits(
        max_epsilon=_epsilon_limit(node_config, "max-epsilon", DEFAULT_MAX_EPSILON, unnoised),
        max_run_epsilon=_epsilon_limit(node_config, "max-run-epsilon",
                                       DEFAULT_MAX_RUN_EPSILON, unnoised),
        max_delta=_positive(node_config, "max-delta"),
        min_noise_multiplier=_positive(node_config, "min-noise-multiplier"),
        allow_unnoised=unnoised,
        max_rounds=None if rounds is None else _whole(node_config, "max-rounds", rounds, 1))


def _epsilon_limit(node_config: Mapping, key: str, default: float, unnoised: bool
                   ) -> float | None:
    """A positive epsilon limit; a deployed site's `default` when unset; `inf` (no
    limit) only with `allow-unnoised=true`."""
    value = _positive(node_config, key)
    if value is None:
        return None if in_simulation() else default
    if math.isinf(value) and not unnoised:
        raise ValueError(f"node config {key}=inf: no limit is allowed only where the site "
                         "also sets allow-unnoised=true; give a finite number > 0")
    return None if math.isinf(value) else value


def work_limits(node_config: Mapping) -> WorkLimits:
    """A deployed site's caps on one task (`max-local-steps`, `max-batch-size`,
    `max-task-seconds`), defaults in `fed_dplora.site.limits.WorkLimits`."""
    defaults = WorkLimits()
    seconds = _positive(node_config, "max-task-seconds") or defaults.max_task_seconds
    return WorkLimits(
        _whole(node_config, "max-local-steps", defaults.max_local_steps, least=1),
        _whole(node_config, "max-batch-size", defaults.max_batch_size, least=1), seconds)


# The task this process runs now has been revoked by its SuperNode (the site runner's
# heartbeat sets it; `begin_task` clears it): its work stops at the next step.
_revoked = threading.Event()


def begin_task() -> None:
    _revoked.clear()


def revoke_task() -> None:
    _revoked.set()


def task_revoked() -> bool:
    return _revoked.is_set()


def allowed_models(node_config: Mapping) -> tuple[str, ...]:
    """`models="a,b"`: the model names (as a run config gives `model.name`) a deployed
    site loads; default: the packaged default model only."""
    value = node_config.get("models", DEFAULT_MODEL)
    if not isinstance(value, str):
        raise ValueError(f"node config models={value!r}: expected a comma-separated string")
    return tuple(name.strip() for name in value.split(",") if name.strip())


def keep_hub_offline(node_config: Mapping) -> None:
    """A deployed site downloads nothing from the Hugging Face hub unless its node
    config sets `allow-hub=true` (only its own folders, packaged models and cache)."""
    allow = node_config.get("allow-hub", False)
    if not isinstance(allow, bool):
        raise ValueError(f"node config allow-hub={allow!r}: expected true or false")
    if allow or in_simulation():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # read at import: set it where it already was
        hub.HF_HUB_OFFLINE = True


def site_state_root(node_config: Mapping) -> Path:
    """Where a site keeps its own tensors between rounds (FedSA's B): node config
    `site-state` (a folder), else $FLWR_HOME/fed-dplora/site-state."""
    path = node_config.get("site-state")
    if path:
        return Path(str(path))
    return _own_folder() / "site-state"


def _own_folder() -> Path:
    """$FLWR_HOME/fed-dplora: the site's own files (flwr has no SuperNode state folder)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr") / "fed-dplora"


def allows_unnoised(node_config: Mapping) -> bool:
    """`allow-unnoised`: whether the site trains rounds without sample-level noise (its
    epsilon is then infinite). Outside the simulation only where the site opts in."""
    value = node_config.get("allow-unnoised", in_simulation())
    if not isinstance(value, bool):
        raise ValueError(f"node config allow-unnoised={value!r}: expected true or false")
    return value


def declared_labels(node_config: Mapping) -> tuple[str, ...]:
    """`labels="a,b,c"`: the label values the site agrees to share (empty: any values
    that look like labels, see `fed_dplora.data.site.shareable_labels`)."""
    value = node_config.get("labels", "")
    if not isinstance(value, str):
        raise ValueError(f"node config labels={value!r}: expected a comma-separated string")
    return tuple(sorted({label.strip() for label in value.split(",") if label.strip()}))


def placement(node_config: Mapping) -> SitePlacement:
    """Where this site's data is. Deployed: its node config's `data-path` (required: a
    run config never points a site at data) and columns (`text-column`, `label-column`;
    default "text", "label"). Simulated: its partition, or a node config data path."""
    path = str(node_config.get("data-path", ""))
    columns = {"text_column": node_config.get("text-column"),
               "label_column": node_config.get("label-column")}
    if not in_simulation():
        if not path:
            raise DataError(
                "this SuperNode's node config has no data-path: a deployed site trains only "
                "on data it declares itself (--node-config 'data-path=\"/secure/notes.csv\"'),"
                " never on a path the run config names")
        columns = {"text_column": columns["text_column"] or "text",
                   "label_column": columns["label_column"] or "label"}
    return SitePlacement(int(node_config.get("partition-id", 0)),
                         int(node_config.get("num-partitions", 1)), path, **columns,
                         own_split=None if in_simulation() else own_split(node_config),
                         account=_account(node_config))


def _account(node_config: Mapping) -> str:
    """`ledger-account`: the name of the site's ledger account (default: its data
    path), kept when the data file moves or changes."""
    value = node_config.get("ledger-account", "")
    if not isinstance(value, str):
        raise ValueError(f"node config ledger-account={value!r}: expected a name (string)")
    return value.strip()


def own_split(node_config: Mapping) -> OwnSplit:
    """A deployed site's split (`fed_dplora.data.site.OwnSplit`) from its node config:
    `split-seed`, `max-records`, `validation-fraction`, `min-train-records`,
    `min-eval-records` (each optional; defaults there)."""
    defaults = OwnSplit()
    fraction = node_config.get("validation-fraction", defaults.validation_fraction)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0.0 <= fraction < 1.0:
        raise ValueError(f"node config validation-fraction={fraction!r}: expected a "
                         "number in [0, 1) (0: no validation split)")
    seed = node_config.get("split-seed")
    return OwnSplit(
        seed=None if seed is None else _whole(node_config, "split-seed", None),
        max_records=_whole(node_config, "max-records", defaults.max_records),
        validation_fraction=float(fraction),
        min_train_records=_whole(node_config, "min-train-records",
                                 defaults.min_train_records, least=1),
        min_eval_records=_whole(node_config, "min-eval-records",
                                defaults.min_eval_records, least=1))


def _whole(node_config: Mapping, key: str, default: int | None, least: int = 0) -> int:
    value = node_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"node config {key}={value!r}: expected a whole number >= {least}")
    return value


def _positive(node_config: Mapping, key: str) -> float | None:
    value = node_config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"node config {key}={value!r}: expected a number > 0")
    return float(value)
