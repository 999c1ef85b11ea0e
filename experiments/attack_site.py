"""The attacker's harness: what a hostile coordinator learns of one deployed site's
labels, against what the site's epsilon allows.

One site runs the real ClientApp in this process, as deployed (fresh randomness, its
own ledger at the default limits, `dp-only` unless a row says otherwise). It holds 100
synthetic notes, 80 of them in its training split (its own `split-seed`). Each trial
draws a target note of that split and gives it a label drawn uniformly from the K = 3
classes. The adversary is the DP threat model's informed one: it knows every note, every
other label and the site's split. Per candidate label it runs a shadow of the site (the
same ClientApp, the same message, no noise) and guesses the candidate whose noise-free
reply is nearest the site's replies (summed squared distance). With one full-batch SGD
step the reply is linear in the clipped gradients, so this is the likelihood-ratio test
of the Gaussian noise. Without a release it guesses at random.

Each strategy's row gives the labels recovered (with a Wilson 95% interval), the epsilon
the site's ledger charged for the whole strategy (replace-one, the relation a changed
label needs), and the DP bound on a guess's accuracy for K classes under a uniform
prior: (e^eps + (K-1) delta) / (e^eps + K - 1), at most e^eps / (e^eps + K - 1) + delta,
at the ledger's (eps, delta) and at its tightest over the ledger's whole privacy profile
delta(eps) (PLD). A `dp-only` strategy that recovers significantly more than the latter
(one-sided binomial test, Bonferroni over the rows) is a privacy bug. Rows that read
metrics a site agreed to share are outside epsilon and say so. The timing row
guesses each label from the site's reply time alone (leave-one-out nearest mean).

    python -m experiments.attack_site [--trials 30] [--strategies NAME ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import logging
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Message
from scipy import stats

from experiments.flwr_job import app_defaults
from experiments.hostile_coordinator import (FEDERATION_LABELS, HostileCoordinator,
                                             as_deployed, head_bias)
from experiments.tiny_models import save_tiny_bert
from fed_dplora.data.demo import generate_site
from fed_dplora.data.sources import TEST_FRACTION, LabelledText, Splits, split
from fed_dplora.privacy.accountants import LIVE_PLD_DISCRETIZATION, make_pld_accountant
from fed_dplora.privacy.events import NeighborRel
from fed_dplora.site.ledger import UNNOISED, SiteLedger, SiteLimits, run_events
from strategies import wire as p
from strategies.wire import to_arrays

log = logging.getLogger("experiments.attack_site")
K = len(FEDERATION_LABELS)
RECORDS, SPLIT_SEED = 100, 7
TRAIN_RECORDS = round(RECORDS * (1 - TEST_FRACTION))
SWEPT_SIGMAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 4.0)
MAX_REPEATS = 100  # rounds the repeated-rounds strategy asks before it gives up
HEAD_SCALE = 10.0  # the crafted head: its weights this many times the init's
OUT = Path(__file__).resolve().parent / "results" / "attack_site"
PROFILE_EPSILONS = np.linspace(0.0, 12.0, 241)  # where the privacy profile is read


def site_records() -> tuple[list[str], list[str]]:
    """The site's notes and their labels (fresh lists: callers may change them)."""
    texts, labels = _records()
    return list(texts), list(labels)


@functools.cache
def _records() -> tuple[tuple[str, ...], tuple[str, ...]]:
    texts, labels = generate_site(0, RECORDS, 0)
    return tuple(texts), tuple(labels)


@functools.cache
def site_splits() -> Splits:
    """The site's split of its notes (its own split seed), as the site draws it."""
    texts, labels = _records()
    return split(LabelledText(texts, labels), TEST_FRACTION, SPLIT_SEED)


def run_config(model: str) -> dict:
    """One full-batch SGD step per round (q = 1: no amplification by sampling)."""
    return {**app_defaults(), "model.name": model, "local-steps": 1,
            "batch-size": TRAIN_RECORDS, "physical-batch-size": TRAIN_RECORDS,
            "learning-rate": 0.5, "optimizer": "sgd"}


@dataclass
class Trial:
    """One target note and its label, the site holding it and the adversary's shadows."""

    folder: Path
    model: str
    target: int  # its row in the site's file
    label: int  # its true label (index into FEDERATION_LABELS)
    rng: random.Random
    shadows: dict = field(default_factory=dict)  # (key, candidate) -> noise-free reply
    reply_s: float | None = None  # how long the site took to answer (one-round)

    def notes(self, label: int) -> Path:
        """The site's file, the target labelled `label`."""
        texts, labels = site_records()
        labels[self.target] = FEDERATION_LABELS[label]
        path = self.folder / f"notes-{label}.csv"
        if not path.exists():
            with path.open("w", newline="") as handle:
                csv.writer(handle).writerows([("text", "label"), *zip(texts, labels)])
        return path

    def site(self, run: int = 1, **node) -> HostileCoordinator:
        """The deployed site in run `run` (its run config's seed the run's), its own
        ledger, `dp-only` unless `node` says otherwise."""
        return HostileCoordinator(self._node(self.label, "site", node),
                                  {**run_config(self.model), "seed": run}, run_id=run)

    def shadow(self, label: int) -> HostileCoordinator:
        """The adversary's copy of the site with the target labelled `label`, no noise."""
        node = {"allow-unnoised": True, "max-epsilon": math.inf,
                "max-run-epsilon": math.inf, "secure-noise": False}
        return HostileCoordinator(self._node(label, f"shadow-{label}", node),
                                  run_config(self.model))

    def _node(self, label: int, name: str, extra: dict) -> dict:
        return {"data-path": str(self.notes(label)), "site-id": "hospital",
                "labels": ",".join(FEDERATION_LABELS), "models": self.model,
                "split-seed": SPLIT_SEED, "privacy-ledger": str(self.folder / f"{name}.json"),
                **extra}

    def charged(self) -> tuple[float, float, tuple]:
        """(epsilon replace-one, delta, its (event, count) pairs) the site's ledger charged
        so far (at the default limits, as the site has them: no row sets max-delta)."""
        ledger = SiteLedger(self.folder / "site.json", SiteLimits())
        accounts = list(ledger.accounts().values())
        if not accounts:
            return 0.0, 0.0, ()
        spend, runs = ledger.spend(accounts[0]), accounts[0]["runs"]
        unnoised = any(steps.get(UNNOISED) for steps in runs.values())
        return spend.replace_one, spend.delta, () if unnoised else run_events(runs)

    def guess(self, releases: list[dict], sent: dict) -> int:
        """The candidate whose noise-free reply to `sent` is nearest the releases."""
        if not releases:
            return self.rng.randrange(K)
        key, distances = digest(sent), []
        for label in range(K):
            if (key, label) not in self.shadows:
                with torch.random.fork_rng():  # a seeded shadow leaves torch's RNG be
                    reply = self.shadow(label).train(sent, 1e-12, False)
                self.shadows[key, label] = released(reply)
            mean = self.shadows[key, label]
            distances.append(sum(sum(float(np.sum((r[n] - mean[n]) ** 2)) for n in mean)
                                 for r in releases))
        return int(np.argmin(distances))


def digest(arrays: dict[str, np.ndarray]) -> str:
    """A name for the tensors a message sent (the shadows' replies are kept by it)."""
    sha = hashlib.sha256()
    for name in sorted(arrays):
        sha.update(name.encode() + np.ascontiguousarray(arrays[name]).tobytes())
    return sha.hexdigest()


def released(reply: Message) -> dict | None:
    """The reply's DP tensors, or None for an error or a decline."""
    if reply.has_error() or p.DECLINED in reply.content[p.CONFIG]:
        return None
    return to_arrays(reply.content[p.ARRAYS])


def new_trial(folder: Path, model: str, rng: random.Random, in_test: bool = False) -> Trial:
    """A target note of the site's training split (test split: `in_test`), unique in its
    file, with a uniformly drawn label."""
    texts, _ = site_records()
    part = site_splits().test if in_test else site_splits().train
    unique = [t for t in part.texts if texts.count(t) == 1]
    target = texts.index(rng.choice(unique))
    folder.mkdir(parents=True)
    return Trial(folder, model, target, rng.randrange(K), rng)


# Strategies: each runs against one trial's site and returns the adversary's guess.

def one_round(trial: Trial, sigma: float = 1.0, crafted: bool = False) -> int:
    """One train message at noise `sigma`; the head crafted, if asked."""
    sent = trial.site().global_arrays()
    if crafted:
        weight = head_bias(sent).removesuffix("bias") + "weight"
        sent = {**sent, weight: sent[weight] * HEAD_SCALE}
    site = trial.site()
    started = time.perf_counter()
    reply = released(site.train(sent, sigma))
    trial.reply_s = time.perf_counter() - started
    return trial.guess([reply] if reply else [], sent)


def weakest_noise(trial: Trial) -> int:
    """Asks ever more noise until the site accepts a round; reads that one."""
    sent, site = trial.site().global_arrays(), trial.site()
    for sigma in SWEPT_SIGMAS:
        reply = released(site.train(sent, sigma))
        if reply is not None:
            return trial.guess([reply], sent)
    return trial.guess([], sent)


def repeated_rounds(trial: Trial, sigma: float) -> int:
    """The same message, round after round, until the site declines."""
    sent, site, releases = trial.site().global_arrays(), trial.site(), []
    for _ in range(MAX_REPEATS):
        reply = released(site.train(sent, sigma))
        if reply is None:
            break
        releases.append(reply)
    return trial.guess(releases, sent)


def new_runs(trial: Trial, sigma: float) -> int:
    """One round at noise `sigma` in run after run, each with its own run id and seed,
    until the site declines (its lifetime limit spans runs)."""
    sent, releases = trial.site().global_arrays(), []
    for run in range(1, MAX_REPEATS + 1):
        reply = released(trial.site(run).train(sent, sigma))
        if reply is None:
            break
        releases.append(reply)
    return trial.guess(releases, sent)


def unnoised(trial: Trial, **node) -> int:
    """A round without noise (sigma 1e-9)."""
    sent = trial.site().global_arrays()
    reply = released(trial.site(**node).train(sent, 1e-9))
    return trial.guess([reply] if reply else [], sent)


def evaluation(trial: Trial, share: str = p.SHARE_DP_ONLY) -> int:
    """An evaluate message; the target note is in the test split. A site that shares
    evaluation sends each class's count of test records: less the other notes' labels,
    that is the target's."""
    reply = trial.site(**{p.SHARE_METRICS: share}).evaluate(trial.site().global_arrays())
    if reply.has_error() or p.EVAL_CLASS_TRUE not in reply.content[p.METRICS]:
        return trial.rng.randrange(K)
    counts = np.array(reply.content[p.METRICS][p.EVAL_CLASS_TRUE])
    texts, _ = site_records()
    test = site_splits().test
    target = texts[trial.target]
    known = [label for text, label in zip(test.texts, test.labels) if text != target]
    return int(np.argmax(counts - [known.count(name) for name in FEDERATION_LABELS]))


@dataclass(frozen=True)
class Strategy:
    name: str
    run: Callable[[Trial], int]
    about: str
    outside_epsilon: bool = False  # reads metrics the site agreed to share
    in_test: bool = False  # the target note is in the site's test split


STRATEGIES = {s.name: s for s in (
    *(Strategy(f"one-round-sigma{sigma:g}", lambda t, sigma=sigma: one_round(t, sigma),
               f"one round at sigma {sigma:g}") for sigma in (1.0, 3.0, 6.0)),
    Strategy("crafted-head-sigma3", lambda t: one_round(t, 3.0, crafted=True),
             f"one round at sigma 3, the head's weights x{HEAD_SCALE:g}"),
    Strategy("weakest-noise", weakest_noise,
             f"sigma swept up from {SWEPT_SIGMAS[0]} until the site accepts a round"),
    Strategy("repeated-rounds-sigma6", lambda t: repeated_rounds(t, 6.0),
             "sigma 6, the same round again until the site declines"),
    Strategy("new-runs-sigma3", lambda t: new_runs(t, 3.0),
             "sigma 3, one round in each new run (its own run id and seed) until declined"),
    Strategy("unnoised", unnoised, "one round at sigma 1e-9"),
    Strategy("evaluate-dp-only", evaluation, "an evaluate message", in_test=True),
    Strategy("evaluate-shared", lambda t: evaluation(t, p.SHARE_EVALUATION),
             "an evaluate message to a site with share-metrics=evaluation",
             outside_epsilon=True, in_test=True),
    Strategy("unnoised-opted-in", lambda t: unnoised(t, **{
        "allow-unnoised": True, "max-epsilon": math.inf, "max-run-epsilon": math.inf}),
             "one round at sigma 1e-9 to a site with allow-unnoised=true (the control)"),
)}


@dataclass(frozen=True)
class Row:
    strategy: str
    about: str
    trials: int
    recovered: int
    interval: tuple[float, float]  # Wilson 95% of the recovery rate
    epsilon: float  # the site's ledger, replace-one, over the whole strategy
    delta: float
    # On a guess's accuracy (None outside epsilon): at the ledger's (epsilon, delta), and
    # the tightest over its privacy profile delta(epsilon)
    point_bound: float | None
    profile_bound: float | None


def accuracy_bound(epsilon: float, delta: float, classes: int = K) -> float:
    """The best accuracy of a guess of a label drawn uniformly from `classes` values,
    from the output of an (epsilon, delta)-DP mechanism (replace-one): summed over the
    guesses, P(g = y | y) <= e^eps P(g = y | y') + delta gives this."""
    if math.isinf(epsilon):
        return 1.0
    odds = math.exp(min(epsilon, 700.0))  # past 700, exp overflows and the bound is 1
    return min(1.0, (odds + (classes - 1) * delta) / (odds + classes - 1))


def profile_bound(events: tuple, classes: int = K) -> float:
    """`accuracy_bound` at its tightest over the ledger's privacy profile: the composed
    events are (eps, delta(eps))-DP for every eps (PLD, replace-one, the ledger's
    discretization; no events: nothing released, chance)."""
    if not events:
        return 1 / classes
    accountant = make_pld_accountant(NeighborRel.REPLACE_ONE, LIVE_PLD_DISCRETIZATION)
    for event, count in events:
        accountant.compose(event, count)
    return min(accuracy_bound(float(eps), accountant.get_delta(float(eps)),
                              classes) for eps in PROFILE_EPSILONS)


def wilson(hits: int, trials: int) -> tuple[float, float]:
    interval = stats.binomtest(hits, trials).proportion_ci(method="wilson")
    return float(interval.low), float(interval.high)


def attack(strategy: Strategy, trials: int, model: str, folder: Path, seed: int
           ) -> tuple[Row, list[tuple[int, float]]]:
    """The strategy's row, and each one-round trial's (label, reply seconds)."""
    rng, hits, charged, timings = random.Random(f"{seed}:{strategy.name}"), 0, [], []
    for index in range(trials):
        trial = new_trial(folder / strategy.name / str(index), model, rng, strategy.in_test)
        with as_deployed():
            hits += strategy.run(trial) == trial.label
        charged.append(trial.charged())
        if trial.reply_s is not None:
            timings.append((trial.label, trial.reply_s))
        log.info("%s: trial %d of %d, %d recovered", strategy.name, index + 1, trials, hits)
    epsilon, delta, events = max(charged, key=lambda c: (c[0], c[1]))
    inside = not strategy.outside_epsilon
    return Row(strategy.name, strategy.about, trials, hits, wilson(hits, trials), epsilon,
               delta, accuracy_bound(epsilon, delta) if inside else None,
               (1.0 if math.isinf(epsilon) else profile_bound(events)) if inside else None
               ), timings


def timing_row(timings: list[tuple[int, float]]) -> dict:
    """Each label guessed from the reply's time alone: the label whose mean time over
    the other trials is nearest (leave-one-out), against chance 1/K."""
    hits = 0
    for index, (label, seconds) in enumerate(timings):
        others = [t for j, t in enumerate(timings) if j != index]
        means = {c: statistics.fmean([s for y, s in others if y == c] or [math.inf])
                 for c in range(K)}
        hits += min(means, key=lambda c: abs(means[c] - seconds)) == label
    by_label = {FEDERATION_LABELS[c]: [s for y, s in timings if y == c] for c in range(K)}
    return {"trials": len(timings), "recovered": hits, "interval": wilson(hits, len(timings)),
            "chance": 1 / K, "same_times_p": float(stats.kruskal(*by_label.values()).pvalue),
            "mean_ms": {n: 1000 * statistics.fmean(v) for n, v in by_label.items()},
            "sd_ms": {n: 1000 * statistics.stdev(v) if len(v) > 1 else math.nan
                      for n, v in by_label.items()}}


def table(rows: list[Row], timing: dict | None) -> str:
    """The markdown table of docs/privacy.md."""
    lines = ["| strategy | what the coordinator sends | labels recovered (95%) | "
             "epsilon charged (replace-one) | bound at that (epsilon, delta) | "
             "bound over the privacy profile |", "|---|---|---|---|---|---|"]
    for row in rows:
        low, high = row.interval
        bounds = ("outside epsilon | outside epsilon" if row.point_bound is None
                  else f"{row.point_bound:.3f} | {row.profile_bound:.3f}")
        lines.append(f"| {row.strategy} | {row.about} | {row.recovered}/{row.trials} "
                     f"({low:.2f}-{high:.2f}) | {row.epsilon:.3g} (delta {row.delta:.2g}) "
                     f"| {bounds} |")
    if timing and timing["trials"]:
        lines.append(timing_line(timing))
    return "\n".join(lines)


def timing_line(timing: dict) -> str:
    low, high = timing["interval"]
    means = ", ".join(f"{n} {ms:.0f} +- {timing['sd_ms'][n]:.0f} ms"
                      for n, ms in timing["mean_ms"].items())
    return (f"| timing | the one-round replies' times by the target's label ({means}; "
            f"Kruskal-Wallis p = {timing['same_times_p']:.2f}) | "
            f"{timing['recovered']}/{timing['trials']} ({low:.2f}-{high:.2f}) | - | "
            f"chance {timing['chance']:.3f} | chance {timing['chance']:.3f} |")


def violations(rows: list[Row], level: float = 0.05) -> list[str]:
    """`dp-only` strategies that recover more than their privacy-profile bound allows:
    a one-sided binomial test at `level`, Bonferroni-corrected over the rows it can
    test (a bound of at least 0.99 tests nothing)."""
    tested = [r for r in rows if r.profile_bound is not None and r.profile_bound < 0.99]
    return [r.strategy for r in tested if stats.binomtest(
        r.recovered, r.trials, r.profile_bound, alternative="greater").pvalue
        < level / len(tested)]


def crafted_against_plain(rows: list[Row]) -> float | None:
    """Fisher's exact p (two-sided) that the crafted head and the plain message at the
    same sigma recover at the same rate."""
    by_name = {r.strategy: r for r in rows}
    if not {"crafted-head-sigma3", "one-round-sigma3"} <= set(by_name):
        return None
    crafted, plain = by_name["crafted-head-sigma3"], by_name["one-round-sigma3"]
    return float(stats.fisher_exact([[crafted.recovered, crafted.trials - crafted.recovered],
                                     [plain.recovered, plain.trials - plain.recovered]]
                                    ).pvalue)


def run(names: list[str], trials: int, out: Path, seed: int = 0) -> dict:
    """Every named strategy against fresh sites; writes results.json and table.md."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        model = save_tiny_bert(Path(work) / "tiny-bert")
        with as_deployed():  # loads what every trial shares: timings start warm
            one_round(new_trial(Path(work) / "warm-up", model, random.Random(seed)))
        rows, timings = [], []
        for name in names:
            row, timed = attack(STRATEGIES[name], trials, model, Path(work), seed)
            rows.append(row)
            timings += timed
    labels_timed = {label for label, _ in timings}
    timing = timing_row(timings) if len(labels_timed) == K else None
    result = {"trials": trials, "seed": seed, "classes": K, "records": RECORDS,
              "rows": [asdict(r) for r in rows], "timing": timing,
              "violations": violations(rows), "crafted_against_plain_p":
              crafted_against_plain(rows), "runtime_s": round(time.perf_counter() - started)}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "table.md").write_text(table(rows, timing) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES),
                        choices=list(STRATEGIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        force=True)
    result = run(args.strategies, args.trials, args.out, args.seed)
    log.info("\n%s", (args.out / "table.md").read_text())
    if result["violations"]:
        raise SystemExit(f"recovered more than the DP bound allows: {result['violations']}")


if __name__ == "__main__":
    main()
