"""An empirical lower bound on epsilon from one training run (Steinke, Nasr and Jagielski,
"Privacy auditing with one (1) training run", NeurIPS 2023), next to the ledger's epsilon.

m canaries (AG News test texts given a random wrong label: only memorisation fits them)
are each inserted into the federation's training data with probability 1/2. After one
federated run, each canary is scored by its loss under the final global model; the
auditor guesses "in" for the k lowest losses and "out" for the k highest and abstains
on the rest. If the run is (eps, delta)-DP, the number v of correct guesses among r = 2k
is at most Binomial(r, e^eps / (1 + e^eps)) plus a delta term (the paper's Theorem 5.2);
the largest eps that this rejects at 95% confidence is the bound. Several k are tried,
with a Bonferroni correction, so the bound keeps its 95%.

    python -m experiments.audit_one_run [--canaries 500] [--out DIR]

The bound must sit below the ledger's epsilon; if it does not, that is a privacy bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
from pathlib import Path

import numpy as np
from scipy import stats

from experiments.audit_mia import per_example
from experiments.flwr_job import LocalFederation
from fed_dplora.data.sources import LabelledText, load_local
from fed_dplora.data.tokenize import tokenize
from fed_dplora.lora.model import load_tokenizer
from fed_dplora.results import load_final_model, read_metrics

log = logging.getLogger("fed_dplora.audit_one_run")
AGNEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "agnews"
SETTINGS = (("none", None, 0.1), ("sample", 8.0, 1.0), ("sample", 1.0, 1.0))
GUESSES = (25, 50, 100, 250)  # k: guesses on each side; Bonferroni over these
CONFIDENCE = 0.95


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[v or more of r guesses correct] if the run is (epsilon, delta)-DP with m
    canaries: the binomial tail plus the paper's delta term (Theorem 5.2)."""
    q = 1.0 / (1.0 + math.exp(-epsilon))  # randomized response's accuracy at epsilon
    tail = float(stats.binom.sf(v - 1, r, q))
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v-1], ..., P[Bin = 0]
    spread = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1))) if v > 0 else 0.0
    return min(1.0, tail + 2 * m * delta * spread)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, alpha: float) -> float:
    """The largest epsilon rejected at level alpha (0 if none is), by bisection."""
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < alpha:
        low, high = high, high * 2
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, r, v, middle, delta) < alpha else (low, middle)
    return low


def audit(losses: np.ndarray, included: np.ndarray, delta: float) -> dict:
    """The best bound over the k of GUESSES (each tested at alpha / len(GUESSES))."""
    order = np.argsort(losses, kind="mergesort")
    alpha = (1 - CONFIDENCE) / len(GUESSES)
    best = {"epsilon_lower_bound": 0.0, "k": None, "r": 0, "v": 0}
    for k in GUESSES:
        if 2 * k > len(losses):
            continue
        v = int(included[order[:k]].sum() + (~included[order[-k:]]).sum())
        bound = epsilon_lower_bound(len(losses), 2 * k, v, delta, alpha)
        if bound >= best["epsilon_lower_bound"]:
            best = {"epsilon_lower_bound": bound, "k": k, "r": 2 * k, "v": v}
    return best


def prepare(work: Path, canaries: int, seed: int) -> tuple[Path, LabelledText, np.ndarray]:
    """A train/test folder with the included canaries; the canaries and which are in."""
    rng = random.Random(seed)
    dev = load_local(AGNEWS / "dev.tsv", "text", "label", seed)
    pool = load_local(AGNEWS / "test.tsv", "text", "label", seed)
    texts = list(pool.train.texts + pool.test.texts)
    labels = list(pool.train.labels + pool.test.labels)
    picked = rng.sample(range(len(texts)), canaries + 1000)
    names = sorted(set(labels))
    wrong = [rng.choice([n for n in names if n != labels[i]]) for i in picked[:canaries]]
    canary = LabelledText(tuple(texts[i] for i in picked[:canaries]), tuple(wrong))
    included = np.array([rng.random() < 0.5 for _ in range(canaries)])
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    train = [(t, y) for t, y in zip(dev.train.texts, dev.train.labels)]
    train += [(t, y) for t, y, inside in zip(canary.texts, canary.labels, included) if inside]
    rng.shuffle(train)
    test = [(texts[i], labels[i]) for i in picked[canaries:]]
    for name, rows in (("train.tsv", train), ("test.tsv", test)):
        (folder / name).write_text("".join(f"{t}\t{y}\n" for t, y in rows))
    return folder, canary, included


def run_setting(federation, folder: Path, work: Path, level: str, epsilon: float | None,
                lr: float, args) -> Path:
    name = level + (f"-eps{epsilon:g}" if epsilon else "")
    run_dir = work / "runs" / name
    if not (run_dir / "summary.json").exists():
        config = {"data.path": str(folder.resolve()), "num-server-rounds": args.rounds,
                  "clients-per-round": args.clients, "local-steps": 10, "batch-size": 64,
                  "physical-batch-size": 64, "model.max-length": 32, "learning-rate": lr,
                  "seed": args.seed, "privacy.level": level, "run-name": name,
                  "output-dir": str(run_dir.parent.resolve())}
        if epsilon:
            config["privacy.target-epsilon"] = epsilon
        log.info("training %s ...", name)
        federation.run(config)
    return run_dir


def score(run_dir: Path, canary: LabelledText, included: np.ndarray) -> dict:
    model, spec, labels = load_final_model(run_dir)
    data = tokenize(canary, load_tokenizer(spec.model), spec.model.max_length, labels)
    losses, _ = per_example(model, data)
    final = read_metrics(run_dir)[-1]
    delta = final["delta"] or 1e-5  # no DP: test against the DP runs' delta
    return {"run": run_dir.name, "epsilon_ledger": final["epsilon_sample"], "delta": delta,
            "eval_accuracy": final["eval_accuracy"], "canaries": len(canary),
            "included": int(included.sum()),
            "loss_in": float(losses[included].mean()),
            "loss_out": float(losses[~included].mean()),
            **audit(losses, included, delta)}


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"One-run audit (Steinke et al. 2023), all-MiniLM-L6-v2 FFA-LoRA, AG News, "
             f"{args.clients} clients, {args.rounds} rounds x 10 steps x batch 64, "
             f"{args.canaries} mislabelled canaries each inserted with probability 1/2, "
             f"seed {args.seed}; bound at {CONFIDENCE:.0%} (Bonferroni over k in "
             f"{list(GUESSES)}).", "",
             "| run | ledger ε | δ | canary loss in / out | best k | correct / guesses | "
             "ε lower bound |", "|---|---|---|---|---|---|---|"]
    for r in results:
        eps = "∞ (no DP)" if r["epsilon_ledger"] is None else f"{r['epsilon_ledger']:.2f}"
        lines.append(f"| {r['run']} | {eps} | {r['delta']:.0e} | {r['loss_in']:.3f} / "
                     f"{r['loss_out']:.3f} | {r['k']} | {r['v']} / {r['r']} | "
                     f"{r['epsilon_lower_bound']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/audit_one_run"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = args.out / "work"
    folder, canary, included = prepare(work, args.canaries, args.seed)
    results = []
    with LocalFederation(args.clients) as federation:
        for level, epsilon, lr in SETTINGS:
            run_dir = run_setting(federation, folder, work, level, epsilon, lr, args)
            results.append(score(run_dir, canary, included))
            log.info("%s", results[-1])
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results, args))
    log.info("\n%s", markdown(results, args))


if __name__ == "__main__":
    main()
