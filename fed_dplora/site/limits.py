"""A deployed site's own limits: what any message may cost it, set in its node config.

Light (no dp-accounting): the ClientApp's start-up imports it.

Privacy limits (`SiteLimits`) are checked by the site's ledger under its lock; work
limits (`WorkLimits`) by the ClientApp before anything is charged, and while it trains.
Every default here is what a deployed site gets when its node config is silent
(docs/deployment.md, "What a site's node config limits").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from fed_dplora.refusals import PublicRefusal

# Below this noise multiplier a round counts as un-noised (charged epsilon = infinity,
# and only where the site set allow-unnoised): one full-batch step at sigma 0.3 alone
# costs epsilon > 15 at delta 1e-5, and the cost of accounting it grows without bound.
UNNOISED_BELOW = 0.3
DEFAULT_MAX_EPSILON = 16.0  # a deployed site's lifetime limit per data source (replace-one)
DEFAULT_MAX_RUN_EPSILON = 10.0  # and per run: the default job ends at 8.56 replace-one
DEFAULT_MAX_ROUNDS = 500  # rounds of one run a site trains
# The ledger's own work is bounded: it refuses, uncomputed, an account past these.
MAX_ACCOUNT_STEPS = 10**6  # DP-SGD steps of one data source, over all its runs
MAX_ACCOUNT_EVENTS = 64  # distinct (q, sigma) pairs of one data source


@dataclass(frozen=True)
class SiteLimits:
    """Set by the hospital in its node config, not by the coordinator. None: no limit
    (a simulation's, or a deployed site's `max-epsilon=inf` with `allow-unnoised`)."""

    max_epsilon: float | None = None  # lifetime, replace-one, for this data source
    max_run_epsilon: float | None = None  # per run, replace-one
    max_delta: float | None = None  # cap on its epsilon's delta (None: the plan's rule's)
    min_noise_multiplier: float | None = None
    allow_unnoised: bool = False  # accept rounds without sample-level noise (eps = inf)
    max_rounds: int | None = None  # rounds of one run


class WorkRefused(PublicRefusal):
    """A round asks for more work than the site's node config allows."""


class WorkStopped(PublicRefusal):
    """A task was stopped while it trained: its wall-time cap passed, or its SuperNode
    no longer acknowledges it. Nothing of the round is released."""


@dataclass(frozen=True)
class WorkLimits:
    """A deployed site's caps on one task's work (node config keys in brackets)."""

    max_local_steps: int = 1000  # `max-local-steps`: DP-SGD steps of one round
    max_batch_size: int = 1024  # `max-batch-size`: expected records of one step
    max_task_seconds: float = 3600.0  # `max-task-seconds`: wall time of one task

    def check(self, local_steps: int, batch_size: int) -> None:
        """`WorkRefused` naming the key when a round's plan passes a cap."""
        for asked, cap, key in ((local_steps, self.max_local_steps, "max-local-steps"),
                                (batch_size, self.max_batch_size, "max-batch-size")):
            if asked > cap:
                raise WorkRefused(f"the round asks for {asked} where this site's node "
                                  f"config allows {key}={cap}")

    def stop_check(self, revoked: Callable[[], bool]) -> Callable[[], None]:
        """A check to call between steps: raises `WorkStopped` once `max_task_seconds`
        have passed since now, or once `revoked()` (the task's SuperNode no longer
        acknowledges it)."""
        deadline = time.monotonic() + self.max_task_seconds

        def check() -> None:
            if revoked():
                raise WorkStopped("this site stopped the task: its SuperNode no longer "
                                  "acknowledges it (the run ended); nothing is released")
            if time.monotonic() > deadline:
                raise WorkStopped(f"this site stopped the task past its node config's "
                                  f"max-task-seconds={self.max_task_seconds:g}; nothing "
                                  "is released")
        return check


def is_unnoised(noise_multiplier: float | None) -> bool:
    """No sample-level noise, or too little to count (`UNNOISED_BELOW`)."""
    return noise_multiplier is None or not noise_multiplier >= UNNOISED_BELOW
