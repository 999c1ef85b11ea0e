"""A study's pre-registration: the ```toml block of `<study>/preregistration.md`
(hypotheses, score, seeds, correction), read by the analysis (`experiments.confirm`)
and by the follow-up sweep (`experiments.tuning`), which runs every seed it names."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from fed_dplora.config.methods import current_name

PREREGISTRATION = "preregistration.md"
AMENDMENTS = "amendment-*.md"  # dated, beside the pre-registration, read in name order
INTERACTION_ARMS = "ffa - vanilla"  # an interaction's gap unless it names its `arms`


def registered(study: Path) -> dict[str, Any]:
    """The pre-registration's TOML block."""
    return _toml_block(study / PREREGISTRATION)


def descriptive(study: Path, ids: set[str]) -> dict[str, str]:
    """Hypothesis id -> "amendment <date>: <reason>" for each one a dated amendment
    marks descriptive (formed on the data that tests it); an unknown id is refused."""
    marked = {}
    for path in sorted(study.glob(AMENDMENTS)):
        amendment = _toml_block(path)
        for entry in amendment.get("descriptive", []):
            if entry["id"] not in ids:
                raise SystemExit(f"{path}: descriptive id {entry['id']!r} is not a "
                                 f"hypothesis of {PREREGISTRATION} ({sorted(ids)})")
            marked[entry["id"]] = f"amendment {amendment['date']}: {entry['reason']}"
    return marked


def _toml_block(path: Path) -> dict[str, Any]:
    block = re.search(r"```toml\n(.*?)```", path.read_text(), re.S)
    if block is None:
        raise SystemExit(f"{path}: no ```toml block to read")
    return tomllib.loads(block.group(1))


def arms(hypothesis: dict) -> tuple[str, str]:
    """The two arms of `difference = "a - b"` (an interaction: of its `arms`), each
    method by its current name (`fed_dplora.config.methods.RENAMED`)."""
    text = (hypothesis.get("arms", INTERACTION_ARMS)
            if hypothesis["difference"] == "interaction" else hypothesis["difference"])
    parts = [part.strip() for part in text.split(" - ")]
    if len(parts) != 2 or not all(parts):
        raise SystemExit(f"{PREREGISTRATION}: hypothesis {hypothesis['id']}: "
                         f"{text!r} is not of the form \"a - b\"")
    return _current(parts[0]), _current(parts[1])


def _current(arm: str) -> str:
    """"method[:score]" with the method's current name."""
    method, colon, score = arm.partition(":")
    return current_name(method) + colon + score


def hypothesis_seeds(hypothesis: dict, family: dict[str, Any]) -> list[int]:
    """The seeds a hypothesis is tested over: its own, or the family's."""
    return list(hypothesis.get("seeds", family["seeds"]))


def seeds_by_setting(plan: dict[str, Any]) -> dict[tuple[str, str, str], set[int]]:
    """(method, privacy, partition) -> every seed some hypothesis needs of that setting:
    both arms, at `at.privacy` and, for an interaction, at its baseline."""
    needed: dict[tuple[str, str, str], set[int]] = {}
    for hypothesis in plan.get("hypothesis", []):
        at = hypothesis["at"]
        interaction = hypothesis["difference"] == "interaction"
        privacies = [at["privacy"]] + ([at["baseline"]] if interaction else [])
        for arm in arms(hypothesis):
            method = arm.partition(":")[0]  # "fedsa:personal" is fedsa's cell
            for privacy in privacies:
                needed.setdefault((method, str(privacy), at["partition"]), set()).update(
                    hypothesis_seeds(hypothesis, plan["family"]))
    return needed
