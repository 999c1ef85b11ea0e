"""Perplexity table, plot and samples of a causal-lm sweep folder.

    python -m experiments.lm_report experiments/results/<name>

Writes into the sweep folder: `results.md` (the base model's perplexity, computed here on
the same test splits; per cell the federated perplexity after each round, next-token
accuracy, epsilon and wall time; then the greedy continuation of every prompt before
fine-tuning and after it, per cell) and `perplexity_vs_round.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402

from experiments.sweep import CELLS, finished_cells  # noqa: E402
from fed_dplora.config import RunSpec  # noqa: E402
from fed_dplora.data.site import SitePlacement, load_site  # noqa: E402
from fed_dplora.data.sources import LabelledText  # noqa: E402
from fed_dplora.data.tokenize import tokenize  # noqa: E402
from fed_dplora.lora.model import ModelRecipe, build_lora_model, load_tokenizer  # noqa: E402
from fed_dplora.run.results import read_metrics  # noqa: E402
from fed_dplora.tasks import task_for  # noqa: E402
from fed_dplora.site.trainer import evaluate_model  # noqa: E402

log = logging.getLogger("fed_dplora.report")


def collect(sweep: Path) -> list[dict[str, Any]]:
    """One entry per finished cell: its config, metrics rows and samples."""
    cells = []
    for folder in finished_cells(sweep):
        samples = [json.loads(line) for line in
                   (folder / "samples.jsonl").read_text().splitlines() if line.strip()]
        cells.append({"name": folder.name, "folder": str(folder),
                      "config": json.loads((folder / "config.json").read_text()),
                      "summary": json.loads((folder / "summary.json").read_text()),
                      "metrics": read_metrics(folder), "samples": samples,
                      "sites": len(json.loads((folder / "privacy_plan.json").read_text())
                                   ["client_sizes"])})
    return cells


def label(cell: dict[str, Any]) -> str:
    config = cell["config"]
    privacy = ("no DP" if config["privacy"]["level"] == "none"
               else f"ε = {config['privacy']['target_epsilon']:g}")
    return f"{config['method']}, {privacy}"


def base_perplexity(cell: dict[str, Any]) -> tuple[float, float]:
    """(perplexity, next-token accuracy) of the base model (LoRA B = 0) on the pooled test
    records of every site: token-weighted, as the federation computes it."""
    config = dict(cell["config"])
    config.pop("label_names")
    spec = RunSpec.from_dict(config)
    model = build_lora_model(ModelRecipe.from_spec(spec, 0), torch.device("cpu"))
    tests = [load_site(spec, SitePlacement(site, cell["sites"])).test
             for site in range(cell["sites"])]
    pooled = LabelledText(sum((t.texts for t in tests), ()), sum((t.labels for t in tests), ()))
    report = evaluate_model(model, task_for(spec.task), tokenize(
        pooled, load_tokenizer(spec.model), spec.model.max_length, None), 64,
        torch.device("cpu"))
    return math.exp(report.loss), report.accuracy


def table(cells: list[dict[str, Any]], ppl: float, acc: float) -> list[str]:
    """Perplexity per round of each cell, below the base model's (`ppl`, `acc`)."""
    rounds = max(len(c["metrics"]) for c in cells)
    head = ("| cell | " + " | ".join(f"ppl r{r}" for r in range(1, rounds + 1))
            + " | next-token acc | ε (sample) | wall s |")
    lines = [head, "|" + "---|" * (rounds + 4),
             f"| base model (before) | {ppl:.2f}" + " | " * (rounds - 1)
             + f" | {acc:.4f} | - | - |"]
    for cell in cells:
        rows = cell["metrics"]
        ppl = [f"{r['eval_perplexity']:.2f}" for r in rows] + ["-"] * (rounds - len(rows))
        eps = rows[-1]["epsilon_sample"]
        lines.append(f"| {label(cell)} | " + " | ".join(ppl)
                     + f" | {rows[-1]['eval_accuracy']:.4f} | "
                     + ("-" if eps is None else f"{eps:.3f}")
                     + f" | {cell['summary'].get('wall_s', 0):.0f} |")
    return lines


def samples(cells: list[dict[str, Any]]) -> list[str]:
    """Each prompt: the base model's continuation (round 0), then each cell's last."""
    first = cells[0]["samples"]
    lines = []
    for prompt in dict.fromkeys(s["prompt"] for s in first):
        before = next(s["continuation"] for s in first
                      if s["round"] == 0 and s["prompt"] == prompt)
        lines += ["", f"**{prompt}** …", "", f"- before fine-tuning: {before!r}"]
        for cell in cells:
            last = max(s["round"] for s in cell["samples"])
            text = next(s["continuation"] for s in cell["samples"]
                        if s["round"] == last and s["prompt"] == prompt)
            lines.append(f"- {label(cell)}, after round {last}: {text!r}")
    return lines


def setup(cell: dict[str, Any]) -> str:
    """One sentence with what every cell shares."""
    c = cell["config"]
    sizes = json.loads((Path(cell["folder"]) / "privacy_plan.json").read_text())["client_sizes"]
    return (f"{c['model']['name']} ({c['task']}), LoRA r={c['lora']['rank']}, "
            f"{c['data']['path'] or c['data']['name']} (first {c['data']['max_records']} "
            f"rows), {len(sizes)} sites of {sorted(set(sizes.values()))} training records, "
            f"max-length {c['model']['max_length']}, {c['num_server_rounds']} rounds x "
            f"{c['train']['local_steps']} steps of expected batch {c['train']['batch_size']}, "
            f"{c['train']['optimizer']} lr {c['train']['learning_rate']:g} (not tuned), "
            f"seed {c['seed']}. Perplexity and next-token accuracy are token-weighted over "
            "every site's test split.")


def plot(cells: list[dict[str, Any]], base: float, out: Path) -> None:
    """Perplexity vs round, every cell starting from the base model's at round 0."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for cell in cells:
        rows = cell["metrics"]
        ax.plot([0] + [r["round"] for r in rows], [base] + [r["eval_perplexity"] for r in rows],
                marker="o", label=label(cell))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0: base model)")
    ax.set_ylabel("test perplexity (token-weighted, all sites)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cells = collect(args.sweep)
    if not cells:
        raise SystemExit(f"{args.sweep}: no finished cell (no {CELLS}/*/summary.json)")
    ppl, acc = base_perplexity(cells[0])
    plot(cells, ppl, args.sweep / "perplexity_vs_round.png")
    text = (["# Perplexity", "", setup(cells[0]), ""] + table(cells, ppl, acc)
            + ["", "# Samples", "", "Greedy continuations written by the server "
               "(samples.jsonl of each cell)."] + samples(cells))
    (args.sweep / "results.md").write_text("\n".join(text) + "\n")
    log.info("wrote %s", args.sweep / "results.md")


if __name__ == "__main__":
    main()
