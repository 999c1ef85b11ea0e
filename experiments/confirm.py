"""The pre-registered family of a tuned study, tested as registered.

Reads the ```toml block of `<study>/preregistration.md` (hypotheses, score, seeds,
correction, and `baselines`: other studies' folders whose cells of the named methods
join this study's), the finished cells at their chosen (validation-tuned) settings,
and writes `<study>/confirmation.md`: each hypothesis's paired difference over the
seeds both arms have run, its one-sided paired t p-value, the Holm-corrected p-value
over the family, and whether it is confirmed; the seeds still missing are named. The
same difference on the mean of the last rounds' test accuracy is reported beside it,
not tested (the registered secondary score).

    python -m experiments.confirm experiments/results/cpu_agnews_regime
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from scipy import stats

from experiments.predictions import PREDICTIONS
from experiments.preregistration import (PREREGISTRATION, arms, descriptive, hypothesis_seeds,
                                         registered)
from experiments.tuning import (LAST_ROUNDS, LAST_ROUNDS_KEY, TUNED_RANK, cell_rows, choose,
                               setting_by_seed)
from fed_dplora.config.methods import RENAMED

log = logging.getLogger("fed_dplora.confirm")
CONFIRMATION = "confirmation.md"
SCORES = {"": "accuracy", "personal": "personal_accuracy"}  # an arm's "method[:score]"
LAST_ROUNDS_SCORES = {score: LAST_ROUNDS_KEY + column for score, column in SCORES.items()}


def study_rows(study: Path, family: dict[str, Any]) -> list[dict]:
    """The study's finished cells and, from each baseline folder (relative to the study),
    the cells of the methods the pre-registration names for it."""
    rows = cell_rows(study)
    for folder, methods in family.get("baselines", {}).items():
        rows += [r for r in cell_rows(study / folder) if r["method"] in methods]
    return rows


def score_by_seed(rows: list[dict], chosen: dict, arm: str, privacy: str,
                  partition: str, column: str | None = None,
                  scores: dict[str, str] = SCORES) -> dict[int, Any]:
    """An arm's score per seed at its chosen setting: "method" is its test accuracy,
    "method:personal" the same under each site's own tensors (FedSA), both as `scores`
    name them; or the rows' `column` instead, if given."""
    method, _, score = arm.partition(":")
    if score not in SCORES:
        raise SystemExit(f"{PREREGISTRATION}: arm {arm!r}: the score after ':' must be "
                         f"one of {sorted(s for s in SCORES if s)}")
    return setting_by_seed(rows, chosen, (method, privacy, partition, TUNED_RANK),
                           column or scores[score])


def differences(rows: list[dict], chosen: dict, hypothesis: dict,
                scores: dict[str, str] = SCORES) -> dict[int, float]:
    """Per seed: arm a minus arm b at `at`, or for an interaction that gap minus the gap
    at the baseline privacy setting."""
    at, (left, right) = hypothesis["at"], arms(hypothesis)
    if hypothesis.get("sided", "greater") != "greater":
        raise SystemExit(f"{PREREGISTRATION}: hypothesis {hypothesis['id']}: only "
                         "sided = \"greater\" (one-sided, a - b > 0) is tested")

    def gap(privacy: str) -> dict[int, float]:
        a, b = (score_by_seed(rows, chosen, arm, privacy, at["partition"], scores=scores)
                for arm in (left, right))
        return {s: a[s] - b[s] for s in a.keys() & b.keys()}
    first = gap(at["privacy"])
    if hypothesis["difference"] != "interaction":
        return first
    base = gap(at["baseline"])
    return {s: first[s] - base[s] for s in first.keys() & base.keys()}


def registered_differences(rows: list[dict], chosen: dict, hypothesis: dict,
                           family: dict[str, Any], scores: dict[str, str] = SCORES
                           ) -> dict[int, float]:
    """`differences` at the seeds the hypothesis was registered over, and no others: a
    seed run later (epsilon 8's seeds 3-6) must not change a pre-registered test."""
    seeds = set(hypothesis_seeds(hypothesis, family))
    return {s: d for s, d in differences(rows, chosen, hypothesis, scores).items()
            if s in seeds}


def discordant_by_seed(rows: list[dict], chosen: dict, hypothesis: dict
                       ) -> dict[int, tuple[int, int, int]]:
    """A difference's arms record by record, per seed where both saved predictions:
    (records, only arm a right, only arm b right). The same seed gives both arms the
    same test records (checked by their digests)."""
    at, (left, right) = hypothesis["at"], arms(hypothesis)
    folders = [score_by_seed(rows, chosen, arm, at["privacy"], at["partition"], "folder")
               for arm in (left, right)]
    out = {}
    for seed in sorted(folders[0].keys() & folders[1].keys()):
        files = [f[seed] / PREDICTIONS for f in folders]
        if all(file.is_file() for file in files):
            a, b = (json.loads(file.read_text())["sites"] for file in files)
            out[seed] = _discordant(a, b, files)
    return out


def _discordant(a: dict, b: dict, files: list[Path]) -> tuple[int, int, int]:
    records = only_a = only_b = 0
    for site in a:
        if a[site]["records_sha256"] != b.get(site, {}).get("records_sha256"):
            raise SystemExit(f"{files[0]} and {files[1]}: site {site} scored other "
                             "records in each: they cannot be paired")
        for label, x, y in zip(a[site]["labels"], a[site]["predicted"], b[site]["predicted"]):
            records += 1
            only_a += x == label != y
            only_b += y == label != x
    return records, only_a, only_b


def mcnemar_greater(only_a: int, only_b: int) -> float | None:
    """Exact McNemar, one-sided: P(at least `only_a` of the discordant records go to a)
    when each is a fair coin (None without a discordant record)."""
    if not only_a + only_b:
        return None
    return float(stats.binomtest(only_a, only_a + only_b, 0.5, "greater").pvalue)


def record_section(rows: list[dict], chosen: dict, hypotheses: list[dict]) -> list[str]:
    """Exploratory, outside the family: each difference record by record, per seed."""
    lines = ["", "## Exploratory: record by record (not in the family, not corrected)", "",
             "Per seed, the test records only one arm classifies correctly, from the cells'",
             f"`{PREDICTIONS}`; exact McNemar, one-sided (a > b).", "",
             "| id | seed | records | only a right | only b right | p |",
             "|---|---|---|---|---|---|"]
    found = False
    # Predictions are the global model's: an arm scored under a site's own tensors
    # ("fedsa:personal") has none to pair.
    for h in (h for h in hypotheses if h["difference"] != "interaction"
              and ":" not in h["difference"]):
        for seed, (records, only_a, only_b) in discordant_by_seed(rows, chosen, h).items():
            found = True
            lines.append(f"| {h['id']} ({h['difference']}) | {seed} | {records} | {only_a} "
                         f"| {only_b} | {_p(mcnemar_greater(only_a, only_b))} |")
    if not found:
        lines[-2:] = [f"No pair of cells at the chosen settings has saved `{PREDICTIONS}` "
                      "yet (cells finished before the sweep saved predictions have none)."]
    return lines


def one_sided_p(values: list[float]) -> float | None:
    """Paired t, H0: mean <= 0 against mean > 0 (None with fewer than 2 seeds)."""
    if len(values) < 2 or statistics.stdev(values) == 0:
        return None
    return float(stats.ttest_1samp(values, 0.0, alternative="greater").pvalue)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (monotone, capped at 1) over the whole family:
    a missing p-value is refused, since dropping it would understate the others'
    (`holm_bounds` handles a family still running)."""
    unknown = sorted(h for h, p in p_values.items() if p is None)
    if unknown:
        raise ValueError(f"holm: no p-value for {', '.join(unknown)}; Holm runs over the "
                         f"whole family (holm_bounds gives the range while some are unknown)")
    adjusted, running = {}, 0.0
    for rank, (p, h) in enumerate(sorted((p, h) for h, p in p_values.items())):
        running = max(running, min(1.0, (len(p_values) - rank) * p))
        adjusted[h] = running
    return {h: adjusted[h] for h in p_values}


def holm_bounds(p_values: dict[str, float | None]) -> dict[str, tuple[float, float] | None]:
    """Each known p-value's Holm-adjusted p while the family's other p-values (None) are
    still unknown: its lowest and highest over every value they could take. Holm's
    adjusted p-values rise with each raw p (closed testing with Bonferroni), so these
    are its values with the unknown ones at 0 and at 1."""
    low = holm({h: 0.0 if p is None else p for h, p in p_values.items()})
    high = holm({h: 1.0 if p is None else p for h, p in p_values.items()})
    return {h: None if p is None else (low[h], high[h]) for h, p in p_values.items()}


def verdict(missing: list[int], bounds: tuple[float, float] | None, alpha: float,
            unfinished: list[str]) -> str:
    """Confirmed only if no outcome of the family's unfinished hypotheses could undo it;
    refuted only if none could confirm it."""
    if missing:
        return (f"not yet: seed{'s' if len(missing) > 1 else ''} "
                + ", ".join(map(str, missing)) + " missing")
    low, high = bounds
    if high < alpha:
        return "yes"
    if low >= alpha:
        return "no"
    return "not yet: Holm p depends on " + ", ".join(unfinished)


def standing(verdict_said: str, amended: str | None) -> str:
    """What a document may call the hypothesis: "confirmed" only for a Holm verdict of
    yes that no amendment marks descriptive."""
    if amended:
        return f"descriptive ({amended})"
    return {"yes": "confirmed", "no": "not confirmed"}.get(verdict_said, "pending")


def confirmation(study: Path) -> str:
    plan = registered(study)
    family, hypotheses = plan["family"], plan["hypothesis"]
    amended = descriptive(study, {h["id"] for h in hypotheses})
    rows = study_rows(study, family)
    chosen = choose(rows)
    diffs = {h["id"]: registered_differences(rows, chosen, h, family) for h in hypotheses}
    raw = {h: one_sided_p(list(d.values())) for h, d in diffs.items()}
    missing = {h["id"]: sorted(set(hypothesis_seeds(h, family)) - set(diffs[h["id"]]))
               for h in hypotheses}
    # A finished hypothesis without a p (fewer than two seeds, or no spread) counts as
    # p = 1: it cannot be confirmed and cannot help another be.
    bounds = holm_bounds({h: None if missing[h] else 1.0 if p is None else p
                          for h, p in raw.items()})
    unfinished = [h for h in missing if missing[h]]
    lines = [f"# Confirmation of the pre-registered family ({PREREGISTRATION})", "",
             f"Score: {family['score']}; paired t over seeds, one-sided; Holm over "
             f"{len(hypotheses)} hypotheses; alpha {family['alpha']}. While some hypotheses "
             "wait for seeds, a finished one's Holm p is the range the others' outcomes "
             "leave it, and its verdict waits unless the whole range is on one side.", "",
             "The Holm verdict is as registered; the standing is what the documents may "
             "call it: a hypothesis a dated amendment (amendment-*.md) marks descriptive "
             "was formed on the data that tests it, and is no confirmatory evidence.", "",
             *renamed_note(hypotheses),
             "| id | claim | seeds | mean difference (points) | p | Holm p | confirmed | "
             f"standing | last {LAST_ROUNDS} rounds' mean: difference (points), not "
             "tested |", "|---|---|---|---|---|---|---|---|---|"]
    for h in hypotheses:
        hid = h["id"]
        values = diffs[hid]
        said = verdict(missing[hid], bounds[hid], family["alpha"], unfinished)
        secondary = registered_differences(rows, chosen, h, family, LAST_ROUNDS_SCORES)
        lines.append(f"| {hid} | {h['claim']} | {sorted(values)} | {_points(values)} | "
                     f"{_p(raw[hid])} | {_p_range(bounds[hid])} | {said} | "
                     f"{standing(said, amended.get(hid))} | {_points(secondary)} |")
    return "\n".join(lines + record_section(rows, chosen, hypotheses)) + "\n"


def renamed_note(hypotheses: list[dict]) -> list[str]:
    """A line naming each method the registered claims call by an earlier name."""
    text = " ".join(h["claim"] + " " + h["difference"] for h in hypotheses).lower()
    named = [(old, new, why) for old, (new, why) in RENAMED.items() if old in text]
    if not named:
        return []
    return ["Claims as registered; renamed since: " + "; ".join(
        f"`{old}` is now `{new}` ({why})" for old, new, why in named) + ".", ""]


def _points(values: dict[int, float]) -> str:
    """The mean of per-seed differences, in points ('-' while there is none)."""
    return f"{100 * statistics.fmean(values.values()):+.2f}" if values else "-"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _p_range(bounds: tuple[float, float] | None) -> str:
    """A Holm p, or the range it can still take while the family is unfinished."""
    if bounds is None:
        return "-"
    low, high = bounds
    return _p(low) if _p(low) == _p(high) else f"{_p(low)} to {_p(high)}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.confirm")
    parser.add_argument("study", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = confirmation(args.study)
    (args.study / CONFIRMATION).write_text(text)
    log.info("%s", text)


if __name__ == "__main__":
    main()
