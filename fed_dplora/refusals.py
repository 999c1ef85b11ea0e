"""What a deployed site may say when it does not do what a message asks.

The site's rule (docs/privacy.md, "Threat model"): every bit a deployed site sends is
the DP mechanism's output, a metric it agreed to share, or a function of public inputs
(node config, run config, the message, its published n). A refusal is one of two kinds:

- `PublicRefusal`: the reason is a function of public inputs only, so its text may leave
  the site whatever it shares (a train message is declined with it; a census or an
  evaluation fails with it).
- `ReleaseWithheld`: a check on private data stopped a release. It always carries the
  same text, whatever fired (the detail stays in the site's own log), and the round is
  charged as if released, so it tells nothing about which record or label caused it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

# The largest magnitude a tensor of a message may hold: an honest adapter or head is
# orders of magnitude below (LoRA B starts at 0; DP-SGD moves it by noise of about
# sigma * C / batch per step), while values near float32's range overflow a forward pass.
MAX_ARRAY_ABS = 1e3

WITHHELD = ("a check on this site's private data stopped the round's release (charged "
            "as released; which check, and why, is in the site's own log)")


class PublicRefusal(ValueError):
    """A site refuses a message for a reason that depends on public inputs only."""


class ReleaseWithheld(RuntimeError):
    """A check on private data stopped a release: one text, whatever fired."""

    def __init__(self) -> None:
        super().__init__(WITHHELD)


def check_message_arrays(arrays: Mapping[str, np.ndarray]) -> None:
    """Every tensor of a message is finite and within +-MAX_ARRAY_ABS, else
    `PublicRefusal` naming the first tensor that is not."""
    for name, array in arrays.items():
        values = np.asarray(array, dtype=np.float64)
        if not np.isfinite(values).all():
            raise PublicRefusal(f"tensor {name!r} of the message holds a non-finite value")
        if values.size and float(np.abs(values).max()) > MAX_ARRAY_ABS:
            raise PublicRefusal(f"tensor {name!r} of the message holds a value of "
                                f"magnitude above {MAX_ARRAY_ABS:g}, the most a site "
                                "accepts")


def check_noise_multiplier(value: object) -> float | None:
    """The round config's noise multiplier: None (no sample-level noise) or a finite
    number >= 0, else `PublicRefusal`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise PublicRefusal(f"the round config's noise-multiplier {value!r} is not a "
                            "finite number >= 0")
    return float(value)
