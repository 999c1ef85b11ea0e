"""Tables and plots of a sweep folder.

    python -m experiments.report experiments/results/<name>

Writes, into the sweep folder: `results.csv` (one row per finished cell),
`results.md` (mean +- std over seeds of final and best eval accuracy, final macro-F1
where the runs report it, final epsilon, rounds, bytes per round, wall time, and the
majority-class accuracy of the evaluation set, the baseline a classifier must beat) and PNG plots: accuracy vs round per method,
accuracy vs epsilon (privacy-utility), accuracy vs LoRA rank, aggregation error vs round.
In a tuned folder (one holding `tuning.md`) the table goes to `cells.md` instead, since
there `results.md` is `experiments.tuning`'s table of the chosen settings.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from experiments.sweep import CELLS, finished_cells, partition_label  # noqa: E402
from experiments.tuning import TUNING_TABLE  # noqa: E402
from fed_dplora.config import DataSpec, RunSpec  # noqa: E402
from fed_dplora.data.site import SitePlacement, load_site  # noqa: E402
from fed_dplora.data.sources import load_local  # noqa: E402
from fed_dplora.run.results import read_metrics  # noqa: E402

log = logging.getLogger("fed_dplora.report")
COLUMNS = ["cell", "dataset", "method", "privacy", "target_epsilon", "epsilon_sample",
           "epsilon_client", "delta", "rank", "learning_rate", "partition", "clients", "seed",
           "rounds",
           "final_accuracy", "final_macro_f1", "best_accuracy", "majority_accuracy", "bytes_up_per_round",
           "bytes_down_per_round", "wall_s"]
GROUP_BY = ["dataset", "method", "privacy", "rank", "learning_rate", "partition", "clients"]


def collect(sweep: Path) -> list[dict[str, Any]]:
    """One row per finished cell (a run folder with its summary.json)."""
    rows = []
    for folder in finished_cells(sweep):
        config = json.loads((folder / "config.json").read_text())
        metrics = read_metrics(folder)
        last = metrics[-1]
        privacy = config["privacy"]
        partition = partition_label(config["data"])
        clients = len(json.loads((folder / "privacy_plan.json").read_text())["client_sizes"])
        spec = RunSpec.from_dict({k: v for k, v in config.items() if k != "label_names"})
        rows.append({
            "cell": folder.name,
            "dataset": _dataset(config["data"]),
            "method": config["method"],
            "privacy": "none" if privacy["level"] == "none"
            else f"{privacy['level']}:{privacy['target_epsilon']:g}",
            "target_epsilon": None if privacy["level"] == "none" else privacy["target_epsilon"],
            "epsilon_sample": last["epsilon_sample"], "epsilon_client": last["epsilon_client"],
            "delta": last["delta"], "rank": config["lora"]["rank"],
            "learning_rate": config["train"]["learning_rate"], "partition": partition,
            "clients": clients,
            "seed": config["seed"], "rounds": last["round"],
            "final_accuracy": last["eval_accuracy"],
            "final_macro_f1": last.get("eval_macro_f1"),  # runs before issue 15 lack it
            "best_accuracy": max(m["eval_accuracy"] for m in metrics),
            "majority_accuracy": majority_accuracy(spec.data, spec.seed, clients),
            "bytes_up_per_round": statistics.mean(m["bytes_up"] for m in metrics),
            "bytes_down_per_round": statistics.mean(m["bytes_down"] for m in metrics),
            "wall_s": sum(m["wall_s"] for m in metrics),
            "_curve": [m["eval_accuracy"] for m in metrics],
            "_agg_error": [m["aggregation_error"] for m in metrics],
        })
    return rows


@lru_cache(maxsize=None)
def majority_accuracy(data: DataSpec, seed: int, clients: int) -> float:
    """Accuracy of always predicting the most frequent label of the evaluation set: the
    union of the clients' test splits (a shared file's partitions cover its test split)."""
    if data.path:
        labels = load_local(data.path, data.text_column, data.label_column, seed).test.labels
    else:
        spec = RunSpec(seed=seed, data=data)
        labels = tuple(y for site in range(clients)
                       for y in load_site(spec, SitePlacement(site, clients)).test.labels)
    return max(Counter(labels).values()) / len(labels)


def _dataset(data: dict) -> str:
    """A readable dataset name: the folder of a data file, or the folder, or the hub id."""
    if not data["path"]:
        return data["name"]
    path = Path(data["path"])
    return path.parent.name if path.suffix else path.name


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if all(isinstance(v, int) for v in values) and len(set(values)) == 1:
        return str(values[0])
    if len(values) == 1 or statistics.stdev(values) < 5e-4:
        return f"{statistics.mean(values):.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        out[tuple(row[k] for k in GROUP_BY)].append(row)
    return dict(sorted(out.items(), key=lambda kv: tuple(map(str, kv[0]))))


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(GROUP_BY) + " | seeds | final acc | final macro-F1 | best acc "
             "| majority class | final ε (sample) | rounds | KB up/round | KB down/round | "
             "wall s |", "|" + "---|" * (len(GROUP_BY) + 10)]
    for key, members in groups(rows).items():
        lines.append("| " + " | ".join(map(str, key)) + f" | {len(members)} | "
                     f"{_mean_std([r['final_accuracy'] for r in members])} | "
                     f"{_mean_std([r['final_macro_f1'] for r in members])} | "
                     f"{_mean_std([r['best_accuracy'] for r in members])} | "
                     f"{statistics.mean(r['majority_accuracy'] for r in members):.3f} | "
                     f"{_mean_std([r['epsilon_sample'] for r in members])} | "
                     f"{_mean_std([r['rounds'] for r in members])} | "
                     f"{statistics.mean(r['bytes_up_per_round'] for r in members) / 1e3:.1f} | "
                     f"{statistics.mean(r['bytes_down_per_round'] for r in members) / 1e3:.1f}"
                     f" | {statistics.mean(r['wall_s'] for r in members):.0f} |")
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], folder: Path) -> list[Path]:
    written = []
    for dataset in sorted({r["dataset"] for r in rows}):
        data = _label_learning_rates([r for r in rows if r["dataset"] == dataset])
        written += [_accuracy_vs_round(data, dataset, folder),
                    _accuracy_vs_epsilon(data, dataset, folder),
                    _accuracy_vs_rank(data, dataset, folder),
                    _aggregation_error(data, dataset, folder)]
    return [p for p in written if p]


def _label_learning_rates(rows: list[dict]) -> list[dict]:
    """Rows trained at another learning rate than most are plotted as their own setting:
    their privacy label carries it ("none, lr 0.1")."""
    common = _most_common(rows, "learning_rate")
    return [r if r["learning_rate"] == common else
            {**r, "privacy": f"{r['privacy']}, lr {r['learning_rate']:g}"} for r in rows]


def _mean_curve(curves: list[list[float]]) -> list[float]:
    length = min(map(len, curves))
    return [statistics.mean(c[i] for c in curves) for i in range(length)]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label(ax, xlabel: str, ylabel: str, title: str, **legend) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, **legend)


def _majority_line(ax, rows) -> None:
    ax.axhline(statistics.mean(r["majority_accuracy"] for r in rows), color="gray",
               linestyle="--", linewidth=1, label="majority class")


def _accuracy_vs_round(rows, dataset, folder) -> Path:
    privacies = sorted({r["privacy"] for r in rows})
    fig, axes = plt.subplots(1, len(privacies), figsize=(4 * len(privacies), 3.4),
                             squeeze=False, sharey=True)
    series = sorted({(r["method"], r["partition"]) for r in rows})
    colors = {key: f"C{i}" for i, key in enumerate(series)}  # the same in every panel
    for ax, privacy in zip(axes[0], privacies):
        for (method, partition), members in sorted(_by(rows, privacy, "method",
                                                       "partition").items()):
            curve = _mean_curve([r["_curve"] for r in members])
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3,
                    color=colors[method, partition], label=f"{method}, {partition}")
        _majority_line(ax, rows)
        ax.set_title(f"{dataset}, privacy {privacy}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("eval accuracy (mean over seeds)")
    handles = {}
    for ax in axes[0]:  # every series once, whichever panels it appears in
        lines, labels = ax.get_legend_handles_labels()
        handles.update(zip(labels, lines))
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=7)
    return _save(fig, folder / f"accuracy_vs_round_{dataset}.png")


def _by(rows, privacy, *keys) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    rank = _most_common(rows, "rank")
    for r in rows:
        if r["privacy"] == privacy and r["rank"] == rank:
            out[tuple(r[k] for k in keys)].append(r)
    return out


def _most_common(rows, key: str):
    """The value of `key` most cells share: the default rank, the default learning rate."""
    values = [r[key] for r in rows]
    return max(set(values), key=values.count)


def _accuracy_vs_epsilon(rows, dataset, folder) -> Path | None:
    rate = _most_common(rows, "learning_rate")  # other rates are separate settings
    private = [r for r in rows if r["target_epsilon"] is not None and r["learning_rate"] == rate]
    targets = sorted({r["target_epsilon"] for r in private})
    if len(targets) < 2:  # one ε is no curve, and a log axis around it is degenerate
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    rank = _most_common(rows, "rank")
    for (method, partition) in sorted({(r["method"], r["partition"]) for r in rows}):
        points = defaultdict(list)
        for r in private:
            if (r["method"], r["partition"], r["rank"]) == (method, partition, rank):
                points[r["target_epsilon"]].append(r)
        if not points:
            continue
        eps = sorted(points)
        ax.errorbar([statistics.mean(r["epsilon_sample"] for r in points[e]) for e in eps],
                    [statistics.mean(r["final_accuracy"] for r in points[e]) for e in eps],
                    yerr=[statistics.pstdev([r["final_accuracy"] for r in points[e]])
                          for e in eps], marker="o", capsize=3, label=f"{method}, {partition}")
        baselines = defaultdict(list)  # the non-private setting (learning rate) that did best
        for r in rows:
            if (r["target_epsilon"] is None and (r["method"], r["partition"], r["rank"])
                    == (method, partition, rank)):
                baselines[r["privacy"]].append(r["final_accuracy"])
        if baselines:
            ax.axhline(max(statistics.mean(b) for b in baselines.values()), linestyle=":",
                       linewidth=1, color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    ax.set_xticks(targets, [f"{e:g}" for e in targets])
    ax.minorticks_off()
    _majority_line(ax, rows)
    _label(ax, "final sample-level ε (ledger, RDP)", "final eval accuracy",
           f"{dataset}: privacy-utility (dotted: best no-DP setting)")
    return _save(fig, folder / f"accuracy_vs_epsilon_{dataset}.png")


def _accuracy_vs_rank(rows, dataset, folder) -> Path | None:
    ranks = sorted({r["rank"] for r in rows})
    if len(ranks) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for setting in sorted({(r["method"], r["privacy"], r["partition"]) for r in rows}):
        points = {k: [r["final_accuracy"] for r in rows
                      if (r["method"], r["privacy"], r["partition"], r["rank"]) == (*setting, k)]
                  for k in ranks}
        xs = [k for k in ranks if points[k]]
        if len(xs) > 1:
            ax.plot(xs, [statistics.mean(points[k]) for k in xs], marker="o",
                    label=", ".join(setting))
    ax.set_xticks(ranks)
    _majority_line(ax, rows)
    _label(ax, "LoRA rank", "final eval accuracy", f"{dataset}: accuracy vs rank")
    return _save(fig, folder / f"accuracy_vs_rank_{dataset}.png")


def _aggregation_error(rows, dataset, folder) -> Path | None:
    rank = _most_common(rows, "rank")
    vanilla = [r for r in rows if r["method"] == "vanilla" and r["rank"] == rank]
    if not vanilla:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    # colour: privacy setting; line style: partition (tab10 alone repeats past 10 lines)
    privacies = sorted({r["privacy"] for r in vanilla})
    partitions = sorted({r["partition"] for r in vanilla})
    for (privacy, partition) in sorted({(r["privacy"], r["partition"]) for r in vanilla}):
        members = [r for r in vanilla if (r["privacy"], r["partition"]) == (privacy, partition)]
        curve = _mean_curve([r["_agg_error"] for r in members])
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3,
                color=plt.cm.tab10(privacies.index(privacy) % 10),
                linestyle=["-", "--", ":", "-."][partitions.index(partition) % 4],
                label=f"{privacy}, {partition}")
    # ||mean(B_i A_i) - mean(B) mean(A)||_F / ||mean(B_i A_i)||_F, exactly 0 under FFA
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _label(ax, "round", "relative aggregation error",
           f"{dataset}: vanilla aggregation error, rank {rank} (FFA: 0)",
           loc="upper left", bbox_to_anchor=(1.01, 1), handlelength=3.5)
    return _save(fig, folder / f"aggregation_error_{dataset}.png")


def report(sweep: Path) -> dict[str, Any]:
    rows = collect(sweep)
    if not rows:
        raise FileNotFoundError(f"{sweep}/{CELLS} holds no finished run folder")
    write_csv(rows, sweep / "results.csv")
    table = markdown_path(sweep)
    table.write_text(markdown(rows))
    return {"rows": len(rows), "table": table, "plots": plots(rows, sweep)}


def markdown_path(sweep: Path) -> Path:
    """`results.md`, unless `experiments.tuning` owns it (its TUNING_TABLE is there)."""
    return sweep / ("cells.md" if (sweep / TUNING_TABLE).exists() else "results.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    result = report(args.sweep)
    log.info("%d cells -> %s/results.csv, %s, %d plots", result["rows"], args.sweep,
             result["table"].name, len(result["plots"]))


if __name__ == "__main__":
    main()
