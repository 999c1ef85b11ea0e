"""An empirical lower bound on epsilon from one training run (Steinke, Nasr and Jagielski,
"Privacy auditing with one (1) training run", NeurIPS 2023), next to the ledger's epsilon.

m canaries (strings of random words from the AG News vocabulary, each with a random
label: nothing but memorisation tells which label a canary has) are each inserted into
the federation's training data with probability 1/2. The clean data is kept small (1,000
AG News records by default: each record is seen about 17 times) so that the
non-private run memorises, which gives the audit the power to bound anything. After one
federated run, each canary is scored by its loss under the final global model; the
auditor guesses "in" for the k lowest losses and "out" for the k highest and abstains
on the rest. If the run is (eps, delta)-DP, the number v of correct guesses among r = 2k
is at most Binomial(r, e^eps / (1 + e^eps)) plus a delta term (the paper's Theorem 5.2);
the largest eps that this rejects at 95% confidence is the bound. Several k are tried,
with a Bonferroni correction, so the bound keeps its 95%.

    python -m experiments.audit_one_run [--canaries 1000] [--clean-records 1000]
        [--runs none eps8 eps1 sigma/10 sigma/1000] [--dp-learning-rate 0.3]
        [--seeds 0 1 2] [--out DIR]

The bound must sit below the ledger's epsilon; if it does not, that is a privacy bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import stats

from experiments.audit_mia import per_example
from experiments.flwr_job import LocalFederation
from fed_dplora.data.sources import LabelledText, load_local
from fed_dplora.data.tokenize import tokenize
from fed_dplora.lora.model import load_tokenizer
from fed_dplora.run.results import load_final_model, read_metrics

log = logging.getLogger("fed_dplora.audit_one_run")
AGNEWS = Path(__file__).resolve().parents[1] / "data" / "agnews"  # python -m fed_dplora.data prepare agnews data/agnews
CANARY_WORDS = 16  # about 25 tokens: within model.max-length 32
TEST_RECORDS = 1000


class Setting(NamedTuple):
    level: str  # privacy.level
    epsilon: float | None  # privacy.target-epsilon
    optimizer: str
    learning_rate: float
    noise_scale: float | None = None  # positive control: this times the eps-1 run's sigma


# No DP with Adam at 0.01, which memorises the canaries (at 0.003 the bound was 0.57, at
# 0.01 1.76: the audit needs a non-private run that leaks to bound anything); DP with SGD
# at --dp-learning-rate.
NO_DP = Setting("none", None, "adam", 0.01)
DP_EPSILONS = {"eps8": 8.0, "eps1": 1.0}
# Positive controls in the same DP pipeline as eps1 (SGD, the same clipping): its sigma
# divided by 10, and by 1,000 (the config refuses 0: fail closed), with a target that
# never stops them. The audit must bound them above 0, above 1 where canaries allow.
CONTROLS = {"sigma/10": 0.1, "sigma/1000": 0.001}
RUNS = ("none", *DP_EPSILONS, *CONTROLS)
UNBOUNDED = 1e12  # the controls' privacy.target-epsilon: the budget stop never fires


def settings(runs: list[str], dp_learning_rate: float) -> list[Setting]:
    """The Settings of the named RUNS, in RUNS' order (the controls after eps1)."""
    def setting(name: str) -> Setting:
        if name == "none":
            return NO_DP
        if name in CONTROLS:
            return Setting("sample", UNBOUNDED, "sgd", dp_learning_rate, CONTROLS[name])
        return Setting("sample", DP_EPSILONS[name], "sgd", dp_learning_rate)
    return [setting(name) for name in RUNS if name in runs]


GUESSES = (25, 50, 100, 250, 500)  # k: guesses on each side; Bonferroni over these
CONFIDENCE = 0.95
ALPHA_PER_K = (1 - CONFIDENCE) / len(GUESSES)  # Bonferroni: each k tested at this level


def guess_counts(canaries: int) -> list[int]:
    """The k of GUESSES that `canaries` allow (k guesses on each side)."""
    return [k for k in GUESSES if 2 * k <= canaries]


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
    """The best bound over the k of GUESSES (each tested at ALPHA_PER_K), and the
    Bonferroni-adjusted p-value of "no leak at all" (epsilon = 0)."""
    order = np.argsort(losses, kind="mergesort")
    best = {"epsilon_lower_bound": 0.0, "k": None, "r": 0, "v": 0}
    no_leak = 1.0
    for k in guess_counts(len(losses)):
        v = int(included[order[:k]].sum() + (~included[order[-k:]]).sum())
        bound = epsilon_lower_bound(len(losses), 2 * k, v, delta, ALPHA_PER_K)
        if bound >= best["epsilon_lower_bound"]:
            best = {"epsilon_lower_bound": bound, "k": k, "r": 2 * k, "v": v}
        no_leak = min(no_leak, len(GUESSES) * p_value(len(losses), 2 * k, v, 0.0, delta))
    return {**best, "p_no_leak": min(1.0, no_leak)}


def highest_bound(canaries: int, delta: float) -> float:
    """The largest bound `canaries` can give at all: every guess right, at the best k."""
    return max(epsilon_lower_bound(canaries, 2 * k, 2 * k, delta, ALPHA_PER_K)
               for k in guess_counts(canaries))


def random_word_canaries(data: LabelledText, count: int, rng: random.Random
                         ) -> LabelledText:
    """`count` strings of CANARY_WORDS words drawn from the vocabulary of `data`, each
    with a label drawn uniformly from those of `data`."""
    vocabulary = sorted({word for text in data.texts for word in text.split()})
    names = sorted(set(data.labels))
    return LabelledText(
        tuple(" ".join(rng.choices(vocabulary, k=CANARY_WORDS)) for _ in range(count)),
        tuple(rng.choice(names) for _ in range(count)))


def prepare(work: Path, canaries: int, clean_records: int, seed: int, sites: int = 4,
            source: Path = AGNEWS / "dev.tsv") -> tuple[Path, LabelledText, np.ndarray]:
    """A train/test folder of `source`'s records with a `site` column (the run
    partitions naturally by it), the included canaries in train; the canaries, and
    which are in. Each clean record's site is drawn from its own seed, before and apart
    from the canaries: inserting canaries leaves every other record where it was."""
    dev = load_local(source, "text", "label", seed)
    placement = random.Random(seed)
    clean = [(t, y, placement.randrange(sites))
             for t, y in list(zip(dev.train.texts, dev.train.labels))[:clean_records]]
    rng = random.Random(seed + 1)
    canary = random_word_canaries(dev.train, canaries, rng)
    included = np.array([rng.random() < 0.5 for _ in range(canaries)])
    train = clean + [(t, y, rng.randrange(sites)) for t, y, inside
                     in zip(canary.texts, canary.labels, included) if inside]
    test = [(t, y, i % sites) for i, (t, y) in
            enumerate(list(zip(dev.test.texts, dev.test.labels))[:TEST_RECORDS])]
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.tsv", train), ("test.tsv", test)):
        (folder / name).write_text("text\tlabel\tsite\n" + "".join(
            f"{t}\t{y}\tsite-{k}\n" for t, y, k in rows))
    return folder, canary, included


def run_name(setting: Setting) -> str:
    if setting.noise_scale is not None:
        return f"sample-sigma-x{setting.noise_scale:g}"
    return setting.level + (f"-eps{setting.epsilon:g}" if setting.epsilon else "")


def run_setting(federation, folder: Path, work: Path, setting: Setting, args,
                seed: int) -> Path:
    run_dir = work / "runs" / run_name(setting)
    if not (run_dir / "summary.json").exists():
        config = {"data.path": str(folder.resolve()), "num-server-rounds": args.rounds,
                  "clients-per-round": args.clients, "local-steps": 10, "batch-size": 64,
                  "physical-batch-size": 64, "model.max-length": 32,
                  "data.partitioner": "natural", "data.partition-column": "site",
                  "optimizer": setting.optimizer, "learning-rate": setting.learning_rate,
                  "seed": seed, "privacy.level": setting.level,
                  "run-name": run_dir.name, "output-dir": str(run_dir.parent.resolve())}
        if setting.epsilon:
            config["privacy.target-epsilon"] = setting.epsilon
        if setting.noise_scale is not None:
            config["privacy.noise-multiplier"] = setting.noise_scale * eps1_sigma(work)
        log.info("training %s ...", run_dir.name)
        federation.run(config)
    return run_dir


def eps1_sigma(work: Path) -> float:
    """The largest per-site sigma the eps-1 run was calibrated to (run it first)."""
    plan = json.loads((work / "runs" / "sample-eps1" / "privacy_plan.json").read_text())
    return max(plan["sample"]["noise_multiplier"].values())


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


def nominal_epsilon(setting: Setting) -> float | None:
    """The epsilon a run's bound is held against: its own target, or for a positive
    control the eps-1 run's, whose sigma it scales down."""
    if setting.noise_scale is not None:
        return DP_EPSILONS["eps1"]
    return setting.epsilon


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    delta = max(r["delta"] for r in results)
    lines = [f"One-run audit (Steinke et al. 2023), all-MiniLM-L6-v2 FFA-LoRA, AG News: "
             f"{args.clean_records} clean records and {args.canaries} random-word canaries "
             f"with random labels, each inserted with probability 1/2, over "
             f"{args.clients} clients; {args.rounds} rounds x 10 steps x batch 64; "
             f"seeds {', '.join(map(str, args.seeds))}; bound at {CONFIDENCE:.0%} "
             f"(Bonferroni over k in {list(GUESSES)}); the highest bound {args.canaries} "
             f"canaries can give is {highest_bound(args.canaries, delta):.2f}.", "",
             "| run | seed | optimizer, lr | ledger ε | δ | test accuracy | canary loss "
             "in / out | best k | correct / guesses | ε lower bound | p (ε = 0) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        eps = "∞ (no DP)" if r["epsilon_ledger"] is None else f"{r['epsilon_ledger']:.3g}"
        lines.append(f"| {r['run']} | {r['seed']} | {r['optimizer']} "
                     f"{r['learning_rate']:g} | {eps} | {r['delta']:.0e} | "
                     f"{r['eval_accuracy']:.3f} | "
                     f"{r['loss_in']:.3f} / {r['loss_out']:.3f} | {r['k']} | "
                     f"{r['v']} / {r['r']} | {r['epsilon_lower_bound']:.3f} | "
                     f"{r['p_no_leak']:.2g} |")
    return "\n".join(lines + ["", *run_summaries(results)]) + "\n"


def run_summaries(results: list[dict]) -> list[str]:
    """Per run, over seeds: how often the bound is above 0 and above the nominal epsilon."""
    lines = []
    for run in dict.fromkeys(r["run"] for r in results):
        rows = [r for r in results if r["run"] == run]
        bounds = ", ".join(f"{r['epsilon_lower_bound']:.2f}" for r in rows)
        line = (f"- {run}: bounds {bounds}; above 0 in "
                f"{sum(r['epsilon_lower_bound'] > 0 for r in rows)} of {len(rows)} seeds")
        nominal = rows[0]["nominal_epsilon"]
        if nominal is not None:
            above = sum(r["epsilon_lower_bound"] > nominal for r in rows)
            line += f", above ε = {nominal:g} in {above} of {len(rows)}"
        lines.append(line + ".")
    return lines


def audit_seed(federation, args: argparse.Namespace, seed: int) -> list[dict]:
    """Every named run on this seed's canaries and clean data, each scored."""
    work = args.out / "work" / f"seed-{seed}"
    folder, canary, included = prepare(work, args.canaries, args.clean_records, seed,
                                       args.clients)
    rows = []
    for setting in settings(args.runs, args.dp_learning_rate):
        run_dir = run_setting(federation, folder, work, setting, args, seed)
        rows.append({**score(run_dir, canary, included), "seed": seed,
                     "nominal_epsilon": nominal_epsilon(setting),
                     "optimizer": setting.optimizer,
                     "learning_rate": setting.learning_rate})
        log.info("%s", rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--clean-records", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/audit_one_run"))
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS),
                        help="the controls (sigma/10, sigma/1000) need eps1's run first")
    parser.add_argument("--dp-learning-rate", type=float, default=0.3,
                        help="SGD learning rate of the DP runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with LocalFederation(args.clients) as federation:
        results = [row for seed in args.seeds for row in audit_seed(federation, args, seed)]
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results, args)
    (args.out / "results.md").write_text(table)
    log.info("\n%s", table)


if __name__ == "__main__":
    main()
