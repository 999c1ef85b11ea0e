"""Flower's flat run config (`"privacy.target-epsilon": 8.0`) parsed once into a
validated `RunSpec`; every problem is one `ConfigError` that names the key and says
what would be valid. Nothing downstream reads the flat mapping again."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, get_args

from fed_dplora.config.methods import METHODS, RENAMED
from fed_dplora.config.specs import (DEMO_DATASET, SECTIONS, TEXT_ONLY_TASKS,
                                     AggregationRule, AggregationWeights, ClientSampling,
                                     ConfigError, Device, EvaluationRule, Optimizer,
                                     Partitioner, Pooling, PrivacyLevel, RunSpec, TaskName)

# The largest per-sample clip norm C a run may set: noise is sigma * C per coordinate, and
# near float32's range (1e30 was accepted before) norms and noise overflow to inf / NaN.
MAX_GRAD_NORM = 100.0

# flat key -> (section, field); section None is RunSpec itself.
_KEYS: dict[str, tuple[str | None, str]] = {
    "task": (None, "task"),
    "method": (None, "method"),
    "num-server-rounds": (None, "num_server_rounds"),
    "clients-per-round": (None, "clients_per_round"),
    "seed": (None, "seed"),
    "output-dir": (None, "output_dir"),
    "run-name": (None, "run_name"),
    "resume": (None, "resume"),
    "device": (None, "device"),
    "local-steps": ("train", "local_steps"),
    "batch-size": ("train", "batch_size"),
    "physical-batch-size": ("train", "physical_batch_size"),
    "learning-rate": ("train", "learning_rate"),
    "optimizer": ("train", "optimizer"),
    "privacy.level": ("privacy", "level"),
    "privacy.target-epsilon": ("privacy", "target_epsilon"),
    "privacy.delta": ("privacy", "delta"),
    "privacy.max-grad-norm": ("privacy", "max_grad_norm"),
    "privacy.noise-multiplier": ("privacy", "noise_multiplier"),
    "privacy.client-target-epsilon": ("privacy", "client_target_epsilon"),
    "privacy.client-delta": ("privacy", "client_delta"),
    "privacy.client-clip-norm": ("privacy", "client_clip_norm"),
    "privacy.client-noise-multiplier": ("privacy", "client_noise_multiplier"),
    "privacy.client-sampling": ("privacy", "client_sampling"),
    "privacy.secure-noise": ("privacy", "secure_noise"),
    "model.name": ("model", "name"),
    "model.max-length": ("model", "max_length"),
    "model.pooling": ("model", "pooling"),
    "lora.rank": ("lora", "rank"),
    "lora.alpha": ("lora", "alpha"),
    "lora.target-modules": ("lora", "target_modules"),
    "data.name": ("data", "name"),
    "data.path": ("data", "path"),
    "data.text-column": ("data", "text_column"),
    "data.label-column": ("data", "label_column"),
    "data.partitioner": ("data", "partitioner"),
    "data.alpha": ("data", "alpha"),
    "data.classes-per-client": ("data", "classes_per_client"),
    "data.partition-column": ("data", "partition_column"),
    "data.demo-records-per-site": ("data", "demo_records_per_site"),
    "data.max-records": ("data", "max_records"),
    "data.validation-fraction": ("data", "validation_fraction"),
    "data.subset": ("data", "subset"),
    "data.train-split": ("data", "train_split"),
    "data.test-split": ("data", "test_split"),
    "min-replies": ("failure", "min_replies"),
    "round-timeout": ("failure", "round_timeout"),
    "max-lost-rounds": ("failure", "max_lost_rounds"),
    "max-site-failures": ("failure", "max_site_failures"),
    "generation.prompts": ("generation", "prompts"),
    "generation.max-new-tokens": ("generation", "max_new_tokens"),
    "aggregation.rule": ("aggregation", "rule"),
    "aggregation.trim-fraction": ("aggregation", "trim_fraction"),
    "aggregation.weights": ("aggregation", "weights"),
    "aggregation.max-weight-share": ("aggregation", "max_weight_share"),
    "evaluation.sites": ("evaluation", "sites"),
    "evaluation.every": ("evaluation", "every"),
    "evaluation.final-all": ("evaluation", "final_all"),
    "evaluation.rule": ("evaluation", "rule"),
    "evaluation.trim-fraction": ("evaluation", "trim_fraction"),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "task": get_args(TaskName),
    "privacy.level": get_args(PrivacyLevel),
    "data.partitioner": get_args(Partitioner),
    "model.pooling": get_args(Pooling),
    "device": get_args(Device),
    "optimizer": get_args(Optimizer),
    "privacy.client-sampling": get_args(ClientSampling),
    "aggregation.rule": get_args(AggregationRule),
    "aggregation.weights": get_args(AggregationWeights),
    "evaluation.rule": get_args(EvaluationRule),
}

_POSITIVE_INT = (
    "num-server-rounds", "clients-per-round", "local-steps", "batch-size",
    "physical-batch-size", "model.max-length", "lora.rank", "lora.alpha",
    "data.demo-records-per-site", "data.classes-per-client", "max-lost-rounds",
    "max-site-failures", "generation.max-new-tokens", "evaluation.every",
)
_POSITIVE_FLOAT = (
    "privacy.target-epsilon", "privacy.max-grad-norm", "data.alpha",
    "privacy.client-target-epsilon", "privacy.client-clip-norm", "round-timeout",
)
# "auto" or a number: key -> (upper bound exclusive or None, what "auto" means)
_AUTO_OR_NUMBER = {
    "privacy.delta": (1.0, "min(1e-5, 1 / (10 * largest client dataset))"),
    "privacy.client-delta": (1.0, "min(1e-5, 1 / (10 * number of clients))"),
    "privacy.noise-multiplier": (None, "calibrated from privacy.target-epsilon"),
    "privacy.client-noise-multiplier": (
        None, "calibrated from privacy.client-target-epsilon"),
    "learning-rate": (None, "the method's default, fed_dplora.config.methods"),
}


def _convert(key: str, value: Any, default: Any) -> Any:
    """Convert one flat value to the type of its dataclass default, or raise."""
    if key in _AUTO_OR_NUMBER:
        return _auto_or_number(key, value)
    if key in _SPECIAL:
        return _SPECIAL[key](key, value)
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:  # noqa: E721 (bool must not pass as int)
        raise ConfigError(f"{key}={value!r}: expected {expected.__name__}, "
                          f"got {type(value).__name__}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{key}={value!r}: valid values are {list(_CHOICES[key])}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: must be a finite number")
    if key in _POSITIVE_INT + _POSITIVE_FLOAT and value <= 0:
        raise ConfigError(f"{key}={value!r}: must be > 0")
    if key == "privacy.max-grad-norm" and value > MAX_GRAD_NORM:
        raise ConfigError(f"{key}={value!r}: must be in (0, {MAX_GRAD_NORM:g}] (a per-sample "
                          "gradient norm; 1.0 is the usual choice)")
    if key == "evaluation.sites" and value < 0:
        raise ConfigError(f"{key}={value!r}: must be >= 0 (0: every site)")
    if key == "data.max-records" and value < 0:
        raise ConfigError(f"{key}={value!r}: must be >= 0 (0: every record)")
    if key == "data.validation-fraction" and not 0.0 <= value < 1.0:
        raise ConfigError(f"{key}={value!r}: must be in [0, 1) (0: no validation split)")
    if key in ("aggregation.trim-fraction", "evaluation.trim-fraction") and not (
            0.0 <= value < 0.5):
        raise ConfigError(f"{key}={value!r}: must be in [0, 0.5) (cut from each side)")
    if key == "aggregation.max-weight-share" and not 0.0 < value <= 1.0:
        raise ConfigError(f"{key}={value!r}: must be in (0, 1] (1: no cap)")
    return value


def _auto_or_number(key: str, value: Any) -> float | None:
    upper, meaning = _AUTO_OR_NUMBER[key]
    valid = "a number in (0, 1)" if upper else "a number > 0"
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r}: expected \"auto\" ({meaning}) or {valid}")
    if not 0.0 < float(value) < (upper or float("inf")):
        raise ConfigError(f"{key}={value!r}: must be {valid}, or \"auto\" ({meaning})")
    return float(value)


def _secure_noise(key: str, value: Any) -> bool | None:
    if value == "auto":
        return None
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected true, false or \"auto\" "
                          "(secure in deployment, seeded in simulation)")
    return value


def _min_replies(key: str, value: Any) -> int | None:
    if value == "all":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r}: expected \"all\" (every site asked "
                          "must answer) or a whole number >= 1")
    return value


def _target_modules(key: str, value: Any) -> tuple[str, ...]:
    if value == "auto":
        return ()
    if not isinstance(value, str):
        raise ConfigError(f"{key}={value!r}: expected \"auto\" (the architecture's "
                          "query and value projections) or a comma-separated string, "
                          "e.g. \"query,value\"")
    modules = tuple(m.strip() for m in value.split(",") if m.strip())
    if not modules:
        raise ConfigError(f"{key}: name at least one module, e.g. \"query,value\", "
                          "or \"auto\"")
    return modules


def _method(key: str, value: Any) -> str:
    if value in RENAMED:
        new, why = RENAMED[value]
        raise ConfigError(f"{key}={value!r} is now {key}={new!r}, renamed {why}")
    if value not in METHODS:
        raise ConfigError(f"{key}={value!r}: valid values are {sorted(METHODS)} (the "
                          "methods registered in fed_dplora/config/methods.py)")
    return value


def _prompts(key: str, value: Any) -> tuple[str, ...]:
    prompts = tuple(p.strip() for p in value.split("|")) if isinstance(value, str) else ()
    if not prompts or not all(prompts):
        raise ConfigError(f"{key}={value!r}: expected prompts separated by \"|\", "
                          "none empty, e.g. \"The patient|Discharge summary:\"")
    return prompts


# Keys whose values are not simply their default's type.
_SPECIAL = {"method": _method,
            "privacy.secure-noise": _secure_noise, "min-replies": _min_replies,
            "lora.target-modules": _target_modules, "generation.prompts": _prompts}


def parse_run_config(flat: Mapping[str, Any]) -> RunSpec:
    """Parse Flower's flat run config into a validated `RunSpec`.

    Keys not given keep their defaults; an unknown key is an error listing valid keys.
    """
    unknown = sorted(set(flat) - set(_KEYS))
    if unknown:
        raise ConfigError(f"unknown run-config key(s) {unknown}; valid keys are "
                          f"{sorted(_KEYS)}")
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in flat.items():
        section, field = _KEYS[key]
        owner = RunSpec if section is None else SECTIONS[section]
        default = {f.name: f.default for f in dataclasses.fields(owner)}[field]
        converted = _convert(key, value, default)
        (top if section is None else sections[section])[field] = converted
    if sections["train"].get("learning_rate") is None:  # "auto", or not given
        method = top.get("method", RunSpec.method)
        sections["train"]["learning_rate"] = METHODS[method].learning_rate
    spec = RunSpec(**top, **{name: cls(**sections[name]) for name, cls in SECTIONS.items()})
    _check_combinations(spec)
    return spec


def _check_combinations(spec: RunSpec) -> None:
    _check_run(spec)
    _check_method(spec)
    _check_data(spec)


def _check_method(spec: RunSpec) -> None:
    entry = METHODS[spec.method]
    if spec.privacy.level not in entry.privacy_levels:
        raise ConfigError(
            f"privacy.level={spec.privacy.level!r} with method={spec.method!r}: "
            f"{entry.why_not}; valid levels for it are {list(entry.privacy_levels)}")


def _check_run(spec: RunSpec) -> None:
    train = spec.train
    if train.physical_batch_size > train.batch_size:
        raise ConfigError(
            f"physical-batch-size={train.physical_batch_size} exceeds batch-size="
            f"{train.batch_size}: the physical batch is a slice of the logical one")
    min_replies = spec.failure.min_replies
    if min_replies is not None and min_replies > spec.clients_per_round:
        raise ConfigError(
            f"min-replies={min_replies} exceeds clients-per-round={spec.clients_per_round}: "
            "no round could succeed; use at most clients-per-round, or \"all\"")
    if spec.run_name and (spec.run_name in (".", "..") or "/" in spec.run_name
                          or "\\" in spec.run_name):
        raise ConfigError(f"run-name={spec.run_name!r}: a folder name under output-dir, "
                          "without path separators")
    if spec.resume and not spec.run_name:
        raise ConfigError(
            "resume=true needs run-name: the run folder (under output-dir) whose last "
            "checkpoint to continue; name runs with run-name=\"...\" to resume them")
    if spec.privacy.client_level and spec.aggregation.rule != "mean":
        raise ConfigError(
            f"aggregation.rule={spec.aggregation.rule!r} with privacy.level="
            f"{spec.privacy.level!r}: client-level DP's sensitivity analysis assumes the "
            "clipped mean (one site moves the sum by at most S); use aggregation.rule="
            "\"mean\", or sample-level DP with a robust rule")


def _check_data(spec: RunSpec) -> None:
    data = spec.data
    if data.path and data.name not in ("", DEMO_DATASET):
        raise ConfigError(
            f"data.path={data.path!r} and data.name={data.name!r} are both set: "
            "set one (data.path for local files, data.name for a hub dataset id)")
    if (data.partitioner == "natural") != bool(data.partition_column):
        raise ConfigError(
            "data.partitioner=\"natural\" and data.partition-column go together: the "
            "column whose values name the clients (one client per value), e.g. "
            "data.partition-column=\"site\"")
    if spec.task in TEXT_ONLY_TASKS and data.partitioner in ("dirichlet", "pathological"):
        raise ConfigError(
            f"data.partitioner={data.partitioner!r} splits by label; task={spec.task!r} "
            "reads text only: use \"iid\" or \"natural\"")
    if data.is_demo and data.partitioner != "iid":
        raise ConfigError(
            f"data.partitioner={data.partitioner!r} applies to data.path or hub data; "
            f"the {DEMO_DATASET!r} demo generates each site's records itself "
            "(per-site vocabulary and label skew)")
