"""The methods study's comparison: every aggregation method side by side.

    python -m experiments.compare_methods experiments/results/cpu_agnews_methods

Reads the study's cells and, as its pre-registration's `baselines` names them, other
studies' cells of the baseline methods (FFA and vanilla from the regime study), over the
pre-registration's family seeds only, so every row is scored over the same seeds even
where a baseline study ran more; each setting runs at its learning rate chosen on
validation (`experiments.tuning`). Writes into the study folder:
- `comparison.md`: per privacy setting and partition, each method's choice, seeds, test
  accuracy and macro-F1 (mean ± 95% t half-width), FedSA's score under each site's own
  B, upload and download bytes per round (all sites together), and its test accuracy
  minus FFA's paired by seed, "not shown" where that interval includes zero;
- `accuracy_vs_upload.png`: test accuracy against upload bytes per round, one point per
  method and privacy setting with its 95% t-interval, one panel per partition.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.confirm import score_by_seed, study_rows  # noqa: E402
from experiments.preregistration import registered  # noqa: E402
from experiments.tuning import (TUNED_RANK, choose, interval,  # noqa: E402
                                markdown_head, markdown_row, privacy_columns,
                                privacy_label, runs_at_choice, t_half_width)
from fed_dplora.config.methods import METHODS  # noqa: E402

log = logging.getLogger("fed_dplora.compare_methods")
COMPARISON, FIGURE = "comparison.md", "accuracy_vs_upload.png"
REFERENCE = "ffa"  # every method's paired difference is taken against it
# What a method's test-accuracy row scores, where its name alone would mislead: FedSA's
# global model has B = 0 (each site's B stays at the site), so its adapters add nothing
# and it is the base encoder with the federated head.
LABELS = {"fedsa": "fedsa shared (B = 0)"}
COLUMNS = ["method", "chosen", "seeds", "test accuracy", "test macro-F1",
           "personal accuracy", "upload KB/round", "download KB/round",
           f"accuracy − {REFERENCE} (paired)"]


def family_rows(study: Path) -> list[dict]:
    """The study's and its baselines' finished cells at the family's seeds."""
    family = registered(study)["family"]
    return [r for r in study_rows(study, family) if r["seed"] in family["seeds"]]


def settings(rows: list[dict], study_methods: set[str]) -> list[tuple[str, str]]:
    """(privacy, partition) pairs the study's own methods ran, privacy in table order."""
    keys = [(r["method"], str(r["privacy"]), r["partition"], r["rank"]) for r in rows
            if r["method"] in study_methods and r["rank"] == TUNED_RANK]
    partitions = sorted({k[2] for k in keys}, key=lambda p: (p != "iid", p))
    return [(p, part) for p in privacy_columns(keys) for part in partitions
            if any(k[1:3] == (p, part) for k in keys)]


def runs_of(rows: list[dict], chosen: dict, method: str, privacy: str,
            partition: str) -> list[dict]:
    return runs_at_choice(rows, chosen, (method, privacy, partition, TUNED_RANK))


def paired_against(rows: list[dict], chosen: dict, method: str, privacy: str,
                   partition: str) -> str:
    """Test accuracy minus the reference's, paired by seed, in points; "not shown" where
    the 95% interval includes zero."""
    ours, theirs = (score_by_seed(rows, chosen, m, privacy, partition)
                    for m in (method, REFERENCE))
    gaps = [ours[s] - theirs[s] for s in sorted(ours.keys() & theirs.keys())]
    if len(gaps) < 2:
        return "-" if not gaps else f"{100 * gaps[0]:+.2f} (n=1)"
    mean, half = 100 * statistics.fmean(gaps), 100 * t_half_width(gaps)
    shown = "" if abs(mean) > half else ", not shown"
    return f"{mean:+.2f} ± {half:.2f} (n={len(gaps)}{shown})"


def method_row(method: str, runs: list[dict], paired: str) -> list[str]:
    best = runs[0]
    personal = [r["personal_accuracy"] for r in runs if r["personal_accuracy"] is not None]
    return [LABELS.get(method, method), f"{best['optimizer']} {best['learning_rate']:g}",
            ", ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"])),
            interval([r["accuracy"] for r in runs]),
            interval([r["macro_f1"] for r in runs]),
            interval(personal) if personal else "",
            f"{statistics.fmean(r['bytes_up'] for r in runs) / 1e3:.1f}",
            f"{statistics.fmean(r['bytes_down'] for r in runs) / 1e3:.1f}",
            paired]


def comparison(rows: list[dict], chosen: dict, study_methods: set[str]) -> str:
    lines = ["# Aggregation methods side by side", "",
             "Each method at its learning rate chosen on validation (seed 0); test "
             "scores over the pre-registration's seeds run at that choice, the same for "
             "every method: mean ± half-width of the 95% t-interval. personal: FedSA's "
             "sites scored under their own B. Bytes: all sites together, per training "
             "round. The last column is exploratory except where preregistration.md names "
             "it (confirmation.md tests those). A choice is provisional until all its "
             "planned candidates have finished: results.md's "
             "candidates column says which.", ""]
    for privacy, partition in settings(rows, study_methods):
        lines += [f"## {privacy_label(privacy)}, {partition}", ""] + markdown_head(COLUMNS)
        for method in METHODS:
            runs = runs_of(rows, chosen, method, privacy, partition)
            if runs:
                paired = ("" if method == REFERENCE else
                          paired_against(rows, chosen, method, privacy, partition))
                lines.append(markdown_row(method_row(method, runs, paired)))
        lines.append("")
    return "\n".join(lines)


def figure_points(rows: list[dict], chosen: dict, study_methods: set[str]
                  ) -> list[tuple[str, str, str, float, float, float | None, int]]:
    """(partition, privacy, method, upload bytes per round, mean test accuracy, 95%
    half-width or None for one seed, seeds): the figure's points."""
    points = []
    for privacy, partition in settings(rows, study_methods):
        for method in METHODS:
            runs = runs_of(rows, chosen, method, privacy, partition)
            if runs:
                accuracy = [r["accuracy"] for r in runs]
                points.append((partition, privacy, method,
                               statistics.fmean(r["bytes_up"] for r in runs),
                               statistics.fmean(accuracy),
                               t_half_width(accuracy) if len(runs) > 1 else None,
                               len(runs)))
    return points


def figure(points: list[tuple], path: Path) -> Path:
    partitions = list(dict.fromkeys(p[0] for p in points))
    privacies = list(dict.fromkeys(p[1] for p in points))
    fig, axes = plt.subplots(1, len(partitions), figsize=(5 * len(partitions), 3.8),
                             squeeze=False, sharey=True)
    markers = dict(zip(METHODS, "osD^v<>"))
    for ax, partition in zip(axes[0], partitions):
        for _, privacy, method, upload, mean, half, seeds in (p for p in points
                                                             if p[0] == partition):
            ax.errorbar(upload, mean, yerr=half, marker=markers[method], capsize=3,
                        color=f"C{privacies.index(privacy)}", linestyle="none",
                        label=f"{LABELS.get(method, method)}, {privacy_label(privacy)} "
                              f"(n={seeds})")
        ax.set_xscale("log")
        ax.set_xlabel("upload bytes per round (all sites)")
        ax.set_title(partition)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test accuracy (95% t-interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare_methods")
    parser.add_argument("study", type=Path, help="the study's results folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = family_rows(args.study)
    study_methods = {r["method"] for r in study_rows(args.study, {})}
    chosen = choose(rows)
    (args.study / COMPARISON).write_text(comparison(rows, chosen, study_methods))
    points = figure_points(rows, chosen, study_methods)
    log.info("%s, %s", args.study / COMPARISON, figure(points, args.study / FIGURE))


if __name__ == "__main__":
    main()
