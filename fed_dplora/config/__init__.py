"""Typed, validated run specification (`specs`), parsed once from Flower's flat run
config (`parse`); the registered aggregation methods (`methods`)."""

from fed_dplora.config.parse import parse_run_config
from fed_dplora.config.specs import (DEFAULT_MODEL, DEMO_DATASET, TEXT_ONLY_TASKS,
                                     AggregationSpec, ConfigError, DataSpec, Device,
                                     EvaluationSpec, FailureSpec, GenerationSpec, LoraSpec,
                                     ModelSpec, PrivacySpec, RunSpec, TaskName, TrainSpec)

__all__ = ["DEFAULT_MODEL", "DEMO_DATASET", "TEXT_ONLY_TASKS", "AggregationSpec",
           "ConfigError", "DataSpec", "Device", "EvaluationSpec", "FailureSpec",
           "GenerationSpec", "LoraSpec", "ModelSpec", "PrivacySpec", "RunSpec",
           "TaskName", "TrainSpec", "parse_run_config"]
