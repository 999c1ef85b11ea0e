"""How far one honest site's local DP-SGD update can move what travels: a bound the
server checks every reply against, so a registered site cannot send B x 1000.

Everything here is fixed by the plan before the round: the site's n, the expected
batch B (q = B / n), K local steps, the clip norm C, its noise multiplier sigma, the
learning rate eta, the optimizer, and d, the number of coordinates that train and
travel. The optimizer is fresh each round (`fed_dplora.site.trainer.make_optimizer`).

SGD with momentum mu (PyTorch's: v_t = mu v_{t-1} + g_t, p_t = p_{t-1} - eta v_t):
each step's gradient is g_t = (S_t + Z_t) / B, where S_t sums b_t clipped per-sample
gradients (||S_t|| <= C b_t, b_t ~ Binomial(n, q)) and Z_t ~ N(0, sigma^2 C^2 I_d).
The update is Delta = -eta sum_t c_t g_t with c_t = sum_{j=0}^{K-t} mu^j <= c_1, so

    ||Delta|| <= eta / B * (c_1 C T + sigma C sqrt(sum_t c_t^2) ||G||),

T = sum_t b_t ~ Binomial(nK, q) and G ~ N(0, I_d). Two analytic tails, each at
probability p / 2 (union bound): Chernoff, P(T >= (1 + x) m) <= exp(-m x^2 / (2 + x))
with m = nKq; and Laurent-Massart, P(||G||^2 >= d + 2 sqrt(d y) + 2 y) <= exp(-y).
An honest reply exceeds the bound with probability below p, whatever its gradients.

Adam (beta1, beta2, bias-corrected; eps only shrinks the step): by Cauchy-Schwarz on
m_t and v_t, each coordinate moves at most eta r_t at step t, with
r_t = (1 - b1) / (1 - b1^t) * sqrt((1 - b2^t) / (1 - b2)) * sqrt(sum_{k<t} (b1^2/b2)^k),
so ||Delta|| <= eta sqrt(d) sum_t r_t always (no tail: noise cannot exceed it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fed_dplora.config import RunSpec
from fed_dplora.privacy.plan import PrivacyPlan

SGD_MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)
FALSE_REJECTION = 1e-6  # per honest reply, the bound's tail probability


@dataclass(frozen=True)
class LocalUpdate:
    """What the plan fixes about one site's local update in one round."""

    records: int  # n, the census training-set size
    expected_batch: int  # B
    steps: int  # K
    clip_norm: float  # C
    noise_multiplier: float  # sigma
    learning_rate: float  # eta
    optimizer: str  # "sgd" (momentum SGD_MOMENTUM) or "adam"
    dimension: int  # d, coordinates that train and travel


def update_norm_bound(update: LocalUpdate, probability: float = FALSE_REJECTION) -> float:
    """A norm an honest update exceeds with probability below `probability`."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    if update.optimizer == "adam":
        return adam_bound(update)
    return sgd_bound(update, probability)


def sgd_bound(update: LocalUpdate, probability: float) -> float:
    weights = [sum(SGD_MOMENTUM ** j for j in range(update.steps - t))
               for t in range(update.steps)]
    q = min(1.0, update.expected_batch / update.records)
    sampled = binomial_upper(update.records * update.steps, q, probability / 2)
    noise = math.sqrt(chi_square_upper(update.dimension, probability / 2))
    signal_part = weights[0] * update.clip_norm * sampled
    noise_part = (update.noise_multiplier * update.clip_norm
                  * math.sqrt(sum(w * w for w in weights)) * noise)
    return update.learning_rate / update.expected_batch * (signal_part + noise_part)


def adam_bound(update: LocalUpdate) -> float:
    b1, b2 = ADAM_BETAS
    ratio = b1 * b1 / b2
    steps = [(1 - b1) / (1 - b1 ** t) * math.sqrt((1 - b2 ** t) / (1 - b2))
             * math.sqrt((1 - ratio ** t) / (1 - ratio)) for t in range(1, update.steps + 1)]
    return update.learning_rate * math.sqrt(update.dimension) * sum(steps)


def binomial_upper(trials: int, q: float, probability: float) -> float:
    """T with P(Binomial(trials, q) >= T) <= probability (Chernoff), at most trials."""
    mean, log_term = trials * q, math.log(1 / probability)
    if mean == 0:
        return 0.0
    excess = (log_term + math.sqrt(log_term ** 2 + 8 * mean * log_term)) / (2 * mean)
    return min(float(trials), (1 + excess) * mean)


def chi_square_upper(dimension: int, probability: float) -> float:
    """Y with P(chi^2_d >= Y) <= probability (Laurent and Massart 2000, Lemma 1)."""
    y = math.log(1 / probability)
    return dimension + 2 * math.sqrt(dimension * y) + 2 * y


def site_update_bounds(spec: RunSpec, plan: PrivacyPlan, sizes: dict[str, int],
                       dimension: int) -> dict[str, float]:
    """Each site's bound for this run (sample-level DP only: without clipping and noise
    at the site nothing bounds an update; client-level DP clips on the server)."""
    if plan.sample is None:
        return {}
    train = spec.train
    return {site: update_norm_bound(LocalUpdate(
        n, train.batch_size, train.local_steps, spec.privacy.max_grad_norm,
        plan.sample.noise_multiplier[site], train.learning_rate, train.optimizer,
        dimension)) for site, n in sizes.items()}
