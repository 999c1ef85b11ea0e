"""The wire format shared by the ServerApp and the ClientApp: message keys, the schema
version, and the codec between named float32 numpy arrays and Flower's `ArrayRecord`.
The one module both sides import (they never import each other)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

WIRE_VERSION = 3  # 2: evaluation replies carry EVAL_WEIGHT; 3: the census, split sizes

# Record keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Query (round 0): what the server needs before it can calibrate and build the model.
NUM_TRAIN_EXAMPLES = "num-train-examples"
LABEL_NAMES = "label-names"
TRAIN_LABEL_NAMES = "train-label-names"  # census: the labels of the training split alone
# census, from a site that shares evaluation: its test and validation records
NUM_TEST_EXAMPLES = "num-test-examples"
NUM_VALIDATION_EXAMPLES = "num-validation-examples"
SITE_ID = "site-id"  # stable across runs: the ledger's account for this client
RANDOMNESS = "randomness"  # how the site draws DP sampling and noise (clients.runtime):
FRESH = "fresh"  # OS CSPRNG: nobody can predict it
SEEDED = "seeded"  # from the server's round seed: a simulation, reproducible
SEEDED_BY_SITE = "seeded-by-site"  # a deployed site opted out: its epsilon is void
SHARE_METRICS = "share-metrics"  # what else the site sends (node config, census reply):
SHARE_ALL = "all"  # train loss, clip fraction, timings, evaluation, error texts
SHARE_EVALUATION = "evaluation"  # DP tensors, accountant's inputs, evaluation metrics
SHARE_DP_ONLY = "dp-only"  # DP tensors and the accountant's inputs only
SHARE_MODES = (SHARE_ALL, SHARE_EVALUATION, SHARE_DP_ONLY)

# Config sent with every train / evaluate message
WIRE = "wire-version"
ROUND = "server-round"
ROUND_SEED = "round-seed"
RUN_KEY = "run-key"  # random per run folder, kept on resume: names a site's own state
NOISE_MULTIPLIER = "noise-multiplier"  # absent: no sample-level DP this round
SECURE_NOISE = "secure-noise"  # the server asks for OS CSPRNG randomness (a client
# outside Flower's simulation uses it whatever is asked)
# Reply metrics (train)
NUM_EXAMPLES = "num-examples"
STEPS = "steps"
SAMPLING_PROBABILITY = "sampling-probability"
TRAIN_LOSS = "train-loss"
CLIP_FRACTION = "clip-fraction"
COMPUTE_S = "compute-s"
A_FINGERPRINT = "a-fingerprint"  # in the reply's ConfigRecord (a string)
DECLINED = "declined"  # in a train reply's ConfigRecord: why the site's own limits refused
DECLINED_WITHHELD = "declined (a dp-only site keeps its reason in its own log)"
# Reply metrics (evaluate)
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
EVAL_CLASS_TRUE = "eval-class-true"  # classification, per class: test records,
EVAL_CLASS_PREDICTED = "eval-class-predicted"  # predictions of the class,
EVAL_CLASS_CORRECT = "eval-class-correct"  # and correct ones (lists, label order)
VALIDATION = "val-"  # prefix of the same evaluation keys for the site's validation split
PERSONAL = "personal-"  # prefix for the test split under the site's own tensors (FedSA)
EVAL_WEIGHT = "eval-weight"  # what loss and accuracy are means over: test records
# (classification) or predicted tokens (causal-lm); the server weights sites by it


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array.from_numpy_ndarray(a) for name, a in arrays.items()})


def to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def payload_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Tensor bytes that travel (serialization headers not counted)."""
    return sum(a.nbytes for a in arrays.values())
