"""Empirical privacy audit: a loss-threshold membership inference attack (Yeom et al.,
CSF 2018) on federated LoRA models trained with and without DP.

Members are the clients' training records (a random subset of SST-2 train), non-members
an equal number of held-out SST-2 train records. Each setting trains through `flwr run`
on the same members; the attacker scores each record by its loss under the final
global model (lower loss: "member"). Reports attack AUC and best-threshold accuracy
(0.5 = no better than guessing) next to train/held-out accuracy and the run's epsilon.
A small member set and many epochs make the non-private model overfit, which is the
regime where the attack has something to find.

    python -m experiments.audit_mia [--members 500] [--rounds 15] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from experiments.flwr_job import LocalFederation
from fed_dplora.data.sources import LabelledText, load_local
from fed_dplora.data.tokenize import TokenizedData, tokenize
from fed_dplora.lora.model import load_tokenizer
from fed_dplora.run.results import load_final_model, read_metrics

log = logging.getLogger("fed_dplora.audit_mia")
SST2 = Path(__file__).resolve().parents[1] / "data" / "sst2"  # python -m fed_dplora.data prepare sst2 data/sst2
SETTINGS = [("none", None), ("sample", 8.0), ("sample", 1.0)]


def auc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counted 1/2."""
    scores = np.concatenate([member_scores, non_member_scores])
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="mergesort")
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    m, n = len(member_scores), len(non_member_scores)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def best_threshold_accuracy(member_scores: np.ndarray, non_member_scores: np.ndarray
                            ) -> float:
    """Balanced accuracy of the best single threshold on the scores."""
    scores = np.concatenate([member_scores, non_member_scores])
    is_member = np.concatenate([np.ones(len(member_scores)), np.zeros(len(non_member_scores))])
    best = 0.5
    for t in np.unique(scores):
        guess = scores >= t
        tpr = guess[is_member == 1].mean()
        tnr = 1 - guess[is_member == 0].mean()
        best = max(best, (tpr + tnr) / 2)
    return float(best)


@torch.no_grad()
def per_example(model: torch.nn.Module, data: TokenizedData) -> tuple[np.ndarray, np.ndarray]:
    """(loss, correct) per record under `model` (dropout off)."""
    model.eval()
    losses, correct = [], []
    for lo in range(0, len(data), 128):
        ids, mask, labels = data.batch(list(range(lo, min(lo + 128, len(data)))),
                                       torch.device("cpu"))
        logits = model(ids, mask)
        losses.append(F.cross_entropy(logits, labels, reduction="none"))
        correct.append(logits.argmax(-1) == labels)
    return torch.cat(losses).numpy(), torch.cat(correct).numpy()


def prepare(work: Path, members: int, seed: int) -> tuple[Path, LabelledText, LabelledText]:
    """A data folder whose train file is the member set; the non-members kept aside."""
    whole = load_local(SST2, "text", "label", seed)
    rows = list(zip(whole.train.texts, whole.train.labels))
    random.Random(seed).shuffle(rows)
    member_rows, held_out = rows[:members], rows[members:2 * members]
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.tsv", member_rows),
                       ("test.tsv", list(zip(whole.test.texts, whole.test.labels)))):
        (folder / name).write_text("".join(f"{t}\t{y}\n" for t, y in part))

    def as_text(part):
        return LabelledText(tuple(t for t, _ in part), tuple(y for _, y in part))
    return folder, as_text(member_rows), as_text(held_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/audit_mia"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    folder, members, non_members = prepare(work, args.members, args.seed)
    results = []
    with LocalFederation(args.clients) as federation:
        for level, epsilon in SETTINGS:
            name = f"{level}" + (f"-eps{epsilon:g}" if epsilon else "")
            run_dir = work / "runs" / name
            if not (run_dir / "adapter").exists():
                log.info("training %s ...", name)
                config = {"data.path": str(folder.resolve()), "num-server-rounds": args.rounds,
                          "clients-per-round": args.clients, "local-steps": 10,
                          "batch-size": 64, "physical-batch-size": 64,
                          "learning-rate": 0.5, "seed": args.seed,
                          "privacy.level": level, "output-dir": str(run_dir.parent.resolve()),
                          "run-name": name}
                if epsilon:
                    config["privacy.target-epsilon"] = epsilon
                federation.run(config)
            results.append(attack(run_dir, name, members, non_members))
            log.info("%s", results[-1])
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results, args)
    (args.out / "results.md").write_text(table)
    log.info("\n%s", table)


def attack(run_dir: Path, name: str, members: LabelledText, non_members: LabelledText
           ) -> dict:
    model, spec, labels = load_final_model(run_dir)
    tokenizer = load_tokenizer(spec.model)
    m_loss, m_ok = per_example(model, tokenize(members, tokenizer, spec.model.max_length,
                                               labels))
    n_loss, n_ok = per_example(model, tokenize(non_members, tokenizer,
                                               spec.model.max_length, labels))
    final = read_metrics(run_dir)[-1]
    return {"setting": name, "epsilon_sample": final["epsilon_sample"],
            "delta": final["delta"], "rounds": final["round"],
            "train_accuracy": float(m_ok.mean()), "held_out_accuracy": float(n_ok.mean()),
            "eval_accuracy": final["eval_accuracy"],
            "mean_loss_members": float(m_loss.mean()),
            "mean_loss_non_members": float(n_loss.mean()),
            "attack_auc": auc(-m_loss, -n_loss),
            "attack_accuracy": best_threshold_accuracy(-m_loss, -n_loss)}


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Loss-threshold MIA, all-MiniLM-L6-v2 FFA-LoRA, {args.clients} clients, "
             f"{args.members} SST-2 member records, {args.members} held-out non-members, "
             f"{args.rounds} rounds x 10 steps x batch 64, seed {args.seed}.", "",
             "| setting | epsilon (sample, RDP) | delta | train acc | held-out acc | "
             "loss members | loss non-members | attack AUC | attack acc |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        eps = "none (no DP)" if r["epsilon_sample"] is None else f"{r['epsilon_sample']:.2f}"
        delta = "-" if r["delta"] is None else f"{r['delta']:.2g}"
        lines.append(f"| {r['setting']} | {eps} | {delta} | {r['train_accuracy']:.3f} | "
                     f"{r['held_out_accuracy']:.3f} | {r['mean_loss_members']:.3f} | "
                     f"{r['mean_loss_non_members']:.3f} | {r['attack_auc']:.3f} | "
                     f"{r['attack_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
