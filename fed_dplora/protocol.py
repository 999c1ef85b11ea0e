"""Message keys and wire-schema version shared by the ServerApp and the ClientApp."""

WIRE_VERSION = 1

# Record keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Query (round 0): what the server needs before it can calibrate and build the model.
NUM_TRAIN_EXAMPLES = "num-train-examples"
LABEL_NAMES = "label-names"
SITE_ID = "site-id"  # stable across runs: the ledger's account for this client

# Config sent with every train / evaluate message
WIRE = "wire-version"
ROUND = "server-round"
ROUND_SEED = "round-seed"
NOISE_MULTIPLIER = "noise-multiplier"  # absent: no sample-level DP this round
SECURE_NOISE = "secure-noise"  # draw DP-SGD sampling and noise from the OS CSPRNG
# Reply metrics (train)
NUM_EXAMPLES = "num-examples"
STEPS = "steps"
SAMPLING_PROBABILITY = "sampling-probability"
TRAIN_LOSS = "train-loss"
CLIP_FRACTION = "clip-fraction"
COMPUTE_S = "compute-s"
A_FINGERPRINT = "a-fingerprint"  # in the reply's ConfigRecord (a string)
# Reply metrics (evaluate)
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
