"""The run specification: frozen dataclasses, one per section, and their defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

TaskName = Literal["sequence-classification", "causal-lm"]
TEXT_ONLY_TASKS = ("causal-lm",)  # tasks that read no label column (fed_dplora.tasks)
PrivacyLevel = Literal["none", "sample", "client", "both"]
Partitioner = Literal["iid", "dirichlet", "pathological", "natural"]
Pooling = Literal["mean", "cls", "last"]
Device = Literal["auto", "cpu", "cuda"]
Optimizer = Literal["sgd", "adam"]
ClientSampling = Literal["fixed", "poisson"]
AggregationRule = Literal["mean", "trimmed-mean", "median"]
AggregationWeights = Literal["census", "uniform"]
EvaluationRule = Literal["pooled", "median", "trimmed-mean"]

DEMO_DATASET = "synthetic-triage"
DEFAULT_MODEL = "all-MiniLM-L6-v2"


class ConfigError(ValueError):
    """A run-config key has a wrong name, type or value."""


@dataclass(frozen=True)
class PrivacySpec:
    """Which DP guarantees a run gives, and their budgets.

    Sample level (DP-SGD inside each client; unit: one record of one client) uses
    `target_epsilon`, `delta`, `max_grad_norm`, `noise_multiplier`. Client level
    (DP-FedAvg on the server; unit: all records of one client) uses the `client_*`
    fields. "both" runs both mechanisms and keeps two ledgers.
    """

    level: PrivacyLevel = "sample"
    target_epsilon: float = 8.0
    delta: float | None = None  # None: min(1e-5, 1 / (10 * largest client dataset))
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # None: calibrated from the target
    client_target_epsilon: float = 8.0
    client_delta: float | None = None  # None: min(1e-5, 1 / (10 * number of clients))
    client_clip_norm: float = 1.0
    client_noise_multiplier: float | None = None  # None: calibrated from the target
    client_sampling: ClientSampling = "poisson"
    secure_noise: bool | None = None  # None ("auto"): secure unless simulated

    @property
    def enabled(self) -> bool:
        return self.level != "none"

    @property
    def sample_level(self) -> bool:
        return self.level in ("sample", "both")

    @property
    def client_level(self) -> bool:
        return self.level in ("client", "both")


@dataclass(frozen=True)
class ModelSpec:
    name: str = DEFAULT_MODEL
    max_length: int = 48
    pooling: Pooling = "mean"


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ()  # (): "auto", the architecture's default


@dataclass(frozen=True)
class GenerationSpec:
    """causal-lm: the server writes greedy continuations of these prompts each round."""

    prompts: tuple[str, ...] = ("The patient was admitted with", "The stock market",
                                "Scientists have discovered")
    max_new_tokens: int = 24


@dataclass(frozen=True)
class DataSpec:
    name: str = DEMO_DATASET
    path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    partitioner: Partitioner = "iid"
    alpha: float = 0.5  # dirichlet
    classes_per_client: int = 1  # pathological
    partition_column: str = ""  # natural: one client per value of this column
    demo_records_per_site: int = 2000
    max_records: int = 0  # > 0: read only the first N records of each data file
    validation_fraction: float = 0.0  # > 0: each site holds out this much of its training
    subset: str = ""  # data.name: the dataset's configuration (GLUE's "sst2"), if any
    train_split: str = "train"  # data.name: the split the sites train on
    test_split: str = "auto"  # data.name: "auto": the first labelled of test, validation

    @property
    def is_demo(self) -> bool:
        return not self.path and self.name == DEMO_DATASET


@dataclass(frozen=True)
class TrainSpec:
    local_steps: int = 10
    batch_size: int = 128  # logical (expected Poisson) batch
    physical_batch_size: int = 64
    learning_rate: float = 1.0  # "auto" in a run config: the method's default
    # SGD with momentum 0.9: under DP noise it learned the demo where Adam stalled.
    optimizer: Optimizer = "sgd"


@dataclass(frozen=True)
class AggregationSpec:
    """How the server combines the valid replies of a round.

    "mean" weights each site by its census training-set size (or uniformly), with no
    site above `max_weight_share` of the total; "trimmed-mean" (Flower's FedTrimmedAvg:
    `trim_fraction` cut from each side, per coordinate) and "median" (FedMedian) are
    unweighted and bound what one hostile site moves. Client-level DP accepts only
    "mean": its sensitivity analysis assumes the clipped sum.
    """

    rule: AggregationRule = "mean"
    trim_fraction: float = 0.2
    weights: AggregationWeights = "census"
    max_weight_share: float = 1.0


@dataclass(frozen=True)
class EvaluationSpec:
    """Which sites evaluate the global model, and when: at 1,000 simulated sites with 10
    training a round, evaluating every site every round costs more than the training.

    `sites` > 0: that many sites a round, drawn independently of who trained (from the
    OS CSPRNG under secret sampling); `every` k: rounds k, 2k, ... evaluate; the last
    planned round evaluates every site if `final_all`. `rule`: how the sites' replies make
    the reported figure (`strategies.evaluation_pooling`): "pooled" over the union of
    their test sets, or the "median" or "trimmed-mean" (`trim_fraction` from each side)
    of their own scores, with the pooled figure beside it.
    """

    sites: int = 0  # 0: every site that shares evaluation
    every: int = 1
    final_all: bool = True
    rule: EvaluationRule = "pooled"
    trim_fraction: float = 0.2


@dataclass(frozen=True)
class FailureSpec:
    """What a round does when sites fail (crash, time out, send an invalid reply)."""

    min_replies: int | None = None  # None ("all"): every site asked must answer validly
    round_timeout: float = 3600.0  # seconds to wait for a round's replies
    max_lost_rounds: int = 3  # consecutive rounds below min-replies before the run stops
    max_site_failures: int = 3  # consecutive failures before a site is no longer asked


@dataclass(frozen=True)
class RunSpec:
    task: TaskName = "sequence-classification"
    method: str = "ffa"  # a name registered in fed_dplora.config.methods
    num_server_rounds: int = 5
    clients_per_round: int = 2
    seed: int = 0
    output_dir: str = "runs"
    run_name: str = ""  # "": a timestamped name
    resume: bool = False  # continue the run folder's last checkpoint
    device: Device = "auto"
    privacy: PrivacySpec = PrivacySpec()
    model: ModelSpec = ModelSpec()
    lora: LoraSpec = LoraSpec()
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec()
    failure: FailureSpec = FailureSpec()
    generation: GenerationSpec = GenerationSpec()
    aggregation: AggregationSpec = AggregationSpec()
    evaluation: EvaluationSpec = EvaluationSpec()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunSpec":
        """Inverse of `to_dict` (e.g. a run folder's config.json)."""
        top = {k: v for k, v in values.items() if k not in SECTIONS}
        # .get: run folders written before a section existed load with its defaults
        sections = {name: section(**values.get(name, {}))
                    for name, section in SECTIONS.items()}
        lora, generation = sections["lora"], sections["generation"]
        sections["lora"] = dataclasses.replace(
            lora, target_modules=tuple(lora.target_modules))
        sections["generation"] = dataclasses.replace(
            generation, prompts=tuple(generation.prompts))
        return cls(**top, **sections)


SECTIONS = {  # RunSpec's sections by name
    "privacy": PrivacySpec,
    "model": ModelSpec,
    "lora": LoraSpec,
    "data": DataSpec,
    "train": TrainSpec,
    "failure": FailureSpec,
    "generation": GenerationSpec,
    "aggregation": AggregationSpec,
    "evaluation": EvaluationSpec,
}
