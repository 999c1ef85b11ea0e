"""Choose each setting's learning rate on validation accuracy; report test results of the
chosen settings only, with 95% intervals over seeds.

    python -m experiments.tuning experiments/configs/<study>.toml

Reads the study's sweep folder. A setting is (method, privacy, partition, LoRA rank);
its candidates are the seed-0 cells that differ only in learning rate and optimizer. The
candidate with the best final-round validation accuracy (ties: the smaller learning
rate) is chosen. Writes into the sweep folder:
- `tuning.md`: every candidate's validation and test accuracy and rounds lost to failing
  sites, the chosen one marked;
- `results.md`: per setting, the chosen hyper-parameters, how many of its planned
  candidates have finished (a choice made before all have is provisional), and the test
  macro-F1 and accuracy of their seeds, mean and 95% t-interval; then the main table
  (method x partition by privacy, rank 8); paired by seed, FFA minus vanilla and no DP
  minus each epsilon; the rank study (method by rank), each method's gain over rank 2
  and FFA minus vanilla at each rank, paired by seed. When the folder holds a
  hand-written `discussion.md` (what the tables show and do not, against published
  results), `results.md` opens with a link to it.
In the study folder, `<name>_chosen.toml`: a sweep over the same base config with
seeds 1 and 2 of every setting whose candidates have all finished, and every further
seed the study's `preregistration.md` tests it over (IID first; no DP, epsilon 8 and 1
before 3), then the rank study (ranks 2, 8, 32 at epsilon 8, IID, seeds
0-2), to run next; it is removed while no setting's choice is final.

Tuning looks at the sites' validation splits many times: that is not covered by the
reported epsilon (each cell's epsilon covers its own training run only).
"""

from __future__ import annotations

import argparse
import json
import os
import logging
import statistics
import tomllib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from scipy import stats

from experiments.preregistration import PREREGISTRATION, registered, seeds_by_setting
from experiments.sweep import REPO, cells, finished_cells, partition_label
from fed_dplora.config.methods import current_name
from fed_dplora.run.results import read_metrics

log = logging.getLogger("fed_dplora.tuning")
TUNED = ("learning_rate", "optimizer")
TUNING_TABLE = "tuning.md"  # every candidate; its presence marks a tuned sweep folder
DISCUSSION = "discussion.md"  # the hand-written reading of results.md, kept beside it
TUNED_RANK = 8  # the LoRA rank the sweep file tunes; the rank study reuses its choices
RANKS = (2, TUNED_RANK, 32)
RANK_COLUMNS = tuple(f"rank {r}" for r in RANKS)
RANK_STUDY = ("8.0", "iid")  # the rank study's privacy and partition
LAST_ROUNDS = 3  # preregistration.md's secondary score: the mean of the last 3 rounds
LAST_ROUNDS_KEY = "last_rounds_"  # a row's column of that mean: this + the final one's


def describe(config: dict[str, Any]) -> dict[str, Any]:
    """A run's setting, seed and tuned hyper-parameters, from its config.json."""
    privacy = config["privacy"]
    return {"method": current_name(config["method"]),
            "partition": partition_label(config["data"]),
            "privacy": ("none" if privacy["level"] == "none"
                        else float(privacy["target_epsilon"])),
            "rank": config["lora"]["rank"], "seed": config["seed"],
            "learning_rate": config["train"]["learning_rate"],
            "optimizer": config["train"]["optimizer"]}


def cell_rows(sweep: Path) -> list[dict[str, Any]]:
    """One row per finished cell: its setting, hyper-parameters, seed, final metrics (and
    under each site's own tensors where the method keeps some, FedSA), bytes per training
    round (all sites together) and the rounds it lost to failing sites (shown, never
    dropped)."""
    rows = []
    for folder in finished_cells(sweep):
        metrics = read_metrics(folder)
        last = metrics[-1]
        summary = json.loads((folder / "summary.json").read_text())
        rows.append({
            "cell": folder.name, "folder": folder,
            **describe(json.loads((folder / "config.json").read_text())),
            "val_accuracy": last.get("val_accuracy"), "accuracy": last["eval_accuracy"],
            "macro_f1": last.get("eval_macro_f1"), "epsilon": last["epsilon_sample"],
            "personal_accuracy": last.get("personal_eval_accuracy"),
            LAST_ROUNDS_KEY + "accuracy": _last_rounds_mean(metrics, "eval_accuracy"),
            LAST_ROUNDS_KEY + "personal_accuracy": _last_rounds_mean(
                metrics, "personal_eval_accuracy"),
            "bytes_up": statistics.fmean(m["bytes_up"] for m in metrics),
            "bytes_down": statistics.fmean(m["bytes_down"] for m in metrics),
            "rounds_lost": summary.get("rounds_lost_to_failures", 0)})
    return rows


def _last_rounds_mean(metrics: list[dict[str, Any]], key: str) -> float | None:
    """`key`'s mean over the last LAST_ROUNDS rounds (None if a round lacks it)."""
    values = [m.get(key) for m in metrics[-LAST_ROUNDS:]]
    return None if None in values else statistics.fmean(values)


def setting(row: dict[str, Any]) -> tuple:
    return (row["method"], str(row["privacy"]), row["partition"], row["rank"])


def planned_candidates(study: dict[str, Any], folder: Path) -> Counter:
    """How many seed-0 candidates the sweep file (in `folder`) plans for each setting."""
    planned = Counter()
    for cell in cells(study, folder):
        row = describe(cell.spec.to_dict())
        if row["seed"] == 0:
            planned[setting(row)] += 1
    return planned


class NoValidation(ValueError):
    """Cells without validation accuracy: a study run without a validation split."""


def choose(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Per setting, the seed-0 candidate with the best validation accuracy; NoValidation
    if any cell has none (nothing to choose on, and none is dropped)."""
    blind = [row for row in rows if row["val_accuracy"] is None]
    if blind:
        raise NoValidation(untunable(blind))
    candidates = defaultdict(list)
    for row in rows:
        if row["seed"] == 0:
            candidates[setting(row)].append(row)
    return {key: max(group, key=lambda r: (r["val_accuracy"], -r["learning_rate"]))
            for key, group in candidates.items()}


def untunable(blind: list[dict[str, Any]]) -> str:
    """Why a sweep whose cells (`blind` rows) have no validation accuracy can't be tuned."""
    sweep = blind[0]["folder"].parent.parent
    return (f"{len(blind)} cells in {sweep} have no validation accuracy (first: "
            f"{blind[0]['cell']}): tuning chooses on validation, so the study's [base] "
            f"needs data.validation-fraction (0 < f < 1); a study without one is reported "
            f"by: python -m experiments.report {sweep}")


def interval(values: list[float]) -> str:
    """mean ± half-width of the 95% t-interval (n = 1: the value alone)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {t_half_width(values):.4f}"


def t_half_width(values: list[float]) -> float:
    """Half-width of the 95% t-interval of the mean (n >= 2)."""
    return stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5


def tried(rows: list[dict[str, Any]]) -> Counter:
    """How many seed-0 candidates of each setting have finished."""
    return Counter(setting(r) for r in rows if r["seed"] == 0)


def tuning_complete(rows: list[dict[str, Any]], planned: Counter) -> set[tuple]:
    """The settings whose planned candidates have all finished: only their choice is
    final (the others' may change as the sweep goes on)."""
    done = tried(rows)
    return {key for key, count in planned.items() if done[key] == count}


def results_table(rows: list[dict[str, Any]], chosen: dict[tuple, dict],
                  planned: Counter) -> list[str]:
    lines = ["| method | privacy | partition | rank | chosen | candidates | seeds | "
             "test macro-F1 | test accuracy | ε | rounds lost |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    done = tried(rows)
    for key, best in sorted(chosen.items(), key=lambda kv: kv[0]):
        runs = chosen_runs(rows, key, best)
        candidates = f"{done[key]}/{planned[key]}" if planned[key] else "-"
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {best['optimizer']} "
            f"{best['learning_rate']:g} | {candidates} | {len(runs)} | "
            f"{interval([r['macro_f1'] for r in runs])} | "
            f"{interval([r['accuracy'] for r in runs])} | "
            + ("-" if runs[0]["epsilon"] is None else f"{runs[0]['epsilon']:.2f}")
            + f" | {sum(r['rounds_lost'] for r in runs)} |")
    return lines


PRIVACY_ORDER = ("none", "8.0", "3.0", "1.0")  # columns of the main table
RUN_ORDER = ("none", "8.0", "1.0", "3.0")  # the follow-up runs the ends of the range first


def privacy_columns(keys: list[tuple]) -> list[str]:
    """The privacy settings among `keys`, in PRIVACY_ORDER, any others after them."""
    privacies = [p for p in PRIVACY_ORDER if any(k[1] == p for k in keys)]
    return privacies + sorted({k[1] for k in keys} - set(privacies))


def privacy_label(privacy: str) -> str:
    return "no DP" if privacy == "none" else f"ε = {float(privacy):g}"


def markdown_row(cells: list[str]) -> str:
    """One row of a markdown table; an empty cell is written as a single space."""
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def markdown_head(columns: list[str]) -> list[str]:
    """A markdown table's header row and its separator."""
    return [markdown_row(columns), "|" + "---|" * len(columns)]


def tuned_rank_settings(chosen: dict[tuple, dict]) -> list[tuple]:
    """The chosen settings at the tuned rank: those of the main table and its paired
    tables (the rank study's other ranks are left out)."""
    return [k for k in chosen if k[3] == TUNED_RANK]


def main_table(rows: list[dict[str, Any]], chosen: dict[tuple, dict],
               complete: set[tuple]) -> list[str]:
    """Method x partition rows, privacy columns (rank 8): the chosen settings' test
    macro-F1 / accuracy, mean ± 95% half-width over n seeds; * marks a provisional choice."""
    keys = tuned_rank_settings(chosen)
    privacies = privacy_columns(keys)
    lines = markdown_head(["method", "partition", *map(privacy_label, privacies)])
    for method, partition in sorted({(k[0], k[2]) for k in keys}):
        row_keys = [(method, p, partition, TUNED_RANK) for p in privacies]
        entries = [summary_entry(rows, chosen, k, k not in complete) for k in row_keys]
        lines.append(markdown_row([method, partition, *entries]))
    return lines


def rank_table(rows: list[dict[str, Any]], chosen: dict[tuple, dict],
               complete: set[tuple], planned: Counter | None = None) -> list[str]:
    """The rank study: method rows, rank columns, epsilon 8, IID. A rank with its own
    planned candidates is provisional until they have finished; a rank that runs at rank
    8's choice, until rank 8's have."""
    planned = planned or Counter()
    lines = markdown_head(["method", *RANK_COLUMNS])
    for method in sorted({k[0] for k in chosen if k[1:3] == RANK_STUDY}):
        tuned = (method, *RANK_STUDY, TUNED_RANK)
        entries = [summary_entry(rows, chosen, key,
                                 (key if key in planned else tuned) not in complete)
                   for key in ((method, *RANK_STUDY, r) for r in RANKS)]
        lines.append(markdown_row([method, *entries]))
    return lines


def summary_entry(rows: list[dict[str, Any]], chosen: dict[tuple, dict], key: tuple,
                  provisional: bool) -> str:
    """'macro-F1 / accuracy (n=seeds)' of a setting's chosen runs; * when provisional."""
    runs = runs_at_choice(rows, chosen, key)
    if not runs:
        return "-"
    return (f"{interval([r['macro_f1'] for r in runs])} / "
            f"{interval([r['accuracy'] for r in runs])} (n={len(runs)})"
            + (" *" if provisional else ""))


def setting_by_seed(rows: list[dict[str, Any]], chosen: dict[tuple, dict], key: tuple,
                    column: str = "accuracy") -> dict[int, float]:
    """A setting's `column` per seed at its chosen candidate ({} while it has none):
    the one place seeds are paired from."""
    return {r["seed"]: r[column] for r in runs_at_choice(rows, chosen, key)
            if r[column] is not None}


def paired_difference(rows: list[dict[str, Any]], chosen: dict[tuple, dict],
                      first: tuple, second: tuple) -> str:
    """Test accuracy of setting `first` minus `second`, paired by seed (a seed fixes the
    data split and the partition for every setting), over the seeds both have run:
    mean ± 95% half-width (n=seeds); '-' while they share none."""
    accuracy = [setting_by_seed(rows, chosen, key) for key in (first, second)]
    seeds = sorted(accuracy[0].keys() & accuracy[1].keys())
    if not seeds:
        return "-"
    return (f"{interval([accuracy[0][s] - accuracy[1][s] for s in seeds])} "
            f"(n={len(seeds)})")


def method_gap_table(rows: list[dict[str, Any]], chosen: dict[tuple, dict]) -> list[str]:
    """FFA minus vanilla, paired by seed: partition rows, privacy columns (rank 8)."""
    privacies = privacy_columns(tuned_rank_settings(chosen))
    lines = markdown_head(["partition", *map(privacy_label, privacies)])
    for partition in sorted({k[2] for k in chosen}):
        entries = [paired_difference(rows, chosen, ("ffa", p, partition, TUNED_RANK),
                                     ("vanilla", p, partition, TUNED_RANK))
                   for p in privacies]
        lines.append(markdown_row([partition, *entries]))
    return lines


def privacy_cost_table(rows: list[dict[str, Any]], chosen: dict[tuple, dict]) -> list[str]:
    """No DP minus each privacy setting, paired by seed: method x partition rows (rank 8)."""
    keys = tuned_rank_settings(chosen)
    privacies = [p for p in privacy_columns(keys) if p != "none"]
    lines = markdown_head(["method", "partition",
                           *(f"no DP − {privacy_label(p)}" for p in privacies)])
    for method, partition in sorted({(k[0], k[2]) for k in keys}):
        entries = [paired_difference(rows, chosen, (method, "none", partition, TUNED_RANK),
                                     (method, p, partition, TUNED_RANK)) for p in privacies]
        lines.append(markdown_row([method, partition, *entries]))
    return lines


def rank_gain_table(rows: list[dict[str, Any]], chosen: dict[tuple, dict]) -> list[str]:
    """Each method's gain over its smallest rank, paired by seed (the rank study)."""
    low, *higher = RANKS
    lines = markdown_head(["method", *(f"rank {r} − rank {low}" for r in higher)])
    for method in sorted({k[0] for k in chosen if k[1:3] == RANK_STUDY}):
        entries = [paired_difference(rows, chosen, (method, *RANK_STUDY, r),
                                     (method, *RANK_STUDY, low)) for r in higher]
        lines.append(markdown_row([method, *entries]))
    return lines


def rank_method_gap_table(rows: list[dict[str, Any]],
                          chosen: dict[tuple, dict]) -> list[str]:
    """FFA minus vanilla at each rank of the rank study, paired by seed."""
    entries = [paired_difference(rows, chosen, ("ffa", *RANK_STUDY, r),
                                 ("vanilla", *RANK_STUDY, r)) for r in RANKS]
    return markdown_head(["", *RANK_COLUMNS]) + [markdown_row(["ffa − vanilla", *entries])]


def chosen_runs(rows: list[dict[str, Any]], key: tuple, best: dict) -> list[dict]:
    """Every seed's run of a setting at its chosen hyper-parameters."""
    return [r for r in rows if setting(r) == key and all(r[t] == best[t] for t in TUNED)]


def runs_at_choice(rows: list[dict[str, Any]], chosen: dict[tuple, dict], key: tuple
                   ) -> list[dict]:
    """`chosen_runs` of setting `key`, [] while it has no choice."""
    return chosen_runs(rows, key, chosen[key]) if key in chosen else []


def tuning_table(rows: list[dict[str, Any]], chosen: dict[tuple, dict]) -> list[str]:
    lines = ["| setting | optimizer | lr | val accuracy | test accuracy | rounds lost | "
             "chosen |", "|---|---|---|---|---|---|---|"]
    for row in sorted((r for r in rows if r["seed"] == 0), key=lambda r: (
            setting(r), r["optimizer"], r["learning_rate"])):
        mark = "**yes**" if chosen.get(setting(row)) is row else ""
        lines.append(f"| {' / '.join(map(str, setting(row)))} | {row['optimizer']} | "
                     f"{row['learning_rate']:g} | {row['val_accuracy']:.4f} | "
                     f"{row['accuracy']:.4f} | {row['rounds_lost']} | {mark} |")
    return lines


def run_priority(key: tuple) -> tuple:
    """The follow-up's order, most informative first: IID before label skew; no DP,
    epsilon 8 and 1 before 3; both methods of a setting next to each other."""
    method, privacy, partition, rank = key
    return (partition != "iid", RUN_ORDER.index(privacy) if privacy in RUN_ORDER
            else len(RUN_ORDER), privacy, partition, method, rank)


def rebased(study: dict[str, Any], config_dir: Path, folder: Path) -> dict[str, Any]:
    """`study` with its relative paths (data.path, model.name) relative to `folder`,
    where the follow-up sweep file is written, instead of the study's config."""
    def rebase(key: str, value: Any) -> Any:
        if key in ("data.path", "model.name") and isinstance(value, str) \
                and value.startswith("."):
            return os.path.relpath((config_dir / value).resolve(), folder.resolve())
        return value
    return {**study, "base": {k: rebase(k, v) for k, v in study["base"].items()}}


FOLLOW_UP_KEYS = ("partition", "privacy", "method", "optimizer", "learning-rate", "seed")


def follow_up_seeds(key: tuple, registered_seeds: dict[tuple, set[int]]) -> list[int]:
    """Seeds 1 and 2 of a chosen setting, and every other seed the pre-registration
    tests it over (seed 0 is the tuning run)."""
    method, privacy, partition, rank = key
    if rank != TUNED_RANK:  # the rank study is not in a pre-registered family
        return [1, 2]
    return sorted(({1, 2} | registered_seeds.get((method, privacy, partition), set())) - {0})


def follow_up(study: dict[str, Any], chosen: dict[tuple, dict],
              params_of: dict[str, dict] | None = None,
              registered_seeds: dict[tuple, set[int]] | None = None,
              planned: Counter | None = None) -> str:
    """The next sweep: seeds 1-2 of each chosen setting (and any further seed the
    pre-registration's `registered_seeds` names for it), then the rank study at rank 8's
    choice for each rank not tuned on its own (neither chosen nor `planned` candidates,
    finished or not). `params_of` (cell name -> its grid values) carries a chosen cell's
    other grid keys (a rank study's `lora.rank`, `lora.alpha`)."""
    tuned_on_its_own = set(chosen) | set(planned or ())
    grids, rank_grids = [], []
    for key in sorted(chosen, key=run_priority):
        method, privacy, partition, rank = key
        grid = {"partition": [partition], "privacy": ["none" if privacy == "none"
                                                      else float(privacy)],
                "method": [method], "optimizer": [chosen[key]["optimizer"]],
                "learning-rate": [chosen[key]["learning_rate"]],
                "seed": follow_up_seeds(key, registered_seeds or {})}
        params = (params_of or {}).get(chosen[key]["cell"], {})
        grid.update({k: [v] for k, v in params.items() if k not in FOLLOW_UP_KEYS})
        grids.append(grid)
        if (privacy, partition) == RANK_STUDY and rank == TUNED_RANK:
            rank_grids += [{**grid, "seed": [0, 1, 2], "lora.rank": [r]} for r in RANKS
                           if (method, privacy, partition, r) not in tuned_on_its_own]
    grids += rank_grids
    toml = lambda value: json.dumps(value, ensure_ascii=False)  # noqa: E731 (valid TOML)
    lines = [f"name = {toml(study['name'])}", f"clients = {study['clients']}",
             f"cpus-per-client = {study.get('cpus-per-client', 1)}", "", "[base]"]
    lines += [f"{toml(k)} = {toml(v)}" for k, v in study["base"].items()]
    lines += ["", "[grid]"] + [f"{toml(k)} = {toml(v)}" for k, v in grids[0].items()]
    for grid in grids[1:]:
        lines += ["", "[[extra]]", "grid = { " + ", ".join(
            f"{toml(k)} = {toml(v)}" for k, v in grid.items()) + " }"]
    return "\n".join(lines) + "\n"


def discussion_link(sweep: Path) -> list[str]:
    """results.md's opening link to the study's hand-written discussion, if it has one."""
    if not (sweep / DISCUSSION).is_file():
        return []
    return [f"What these tables show and do not show, and how they compare with published "
            f"results: [{DISCUSSION}]({DISCUSSION}) (hand-written).", ""]


RESULTS_HEADER = (
    "Test results of the settings chosen on validation accuracy (tuning is not covered by "
    "ε). candidates: seed-0 candidates finished / planned by the sweep file; a choice "
    "made before all have finished is provisional. -: not tuned (the rank study reuses "
    "rank 8's choice). rounds lost: rounds of the chosen runs that failing sites cost "
    "(summed over seeds).")

MAIN_HEADER = (
    "Main table, rank 8: test macro-F1 / test accuracy, mean ± half-width of the 95% "
    "t-interval over n seeds; * a provisional choice; - not run.")
RANK_HEADER = ("The rank study, ε = 8, IID (same format): a rank tuned on its own at its own "
               "choice, any other at rank 8's.")
GAP_HEADER = (
    "FFA minus vanilla, test accuracy, paired by seed (a seed fixes the data split and the "
    "partition): mean ± 95% half-width over the n seeds both methods have run.")
COST_HEADER = ("What privacy costs: the non-private choice minus each private one, test "
               "accuracy, paired by seed (same format).")
RANK_GAIN_HEADER = (f"The rank study's gain over rank {RANKS[0]}, test accuracy, paired "
                    "by seed.")
RANK_GAP_HEADER = "The rank study: FFA minus vanilla at each rank, paired by seed."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    study = tomllib.loads(args.config.read_text())
    sweep = REPO / "experiments" / "results" / study["name"]
    rows, planned = cell_rows(sweep), planned_candidates(study, args.config.parent)
    try:
        chosen = choose(rows)
    except NoValidation as error:
        parser.error(str(error))
    complete = tuning_complete(rows, planned)
    (sweep / TUNING_TABLE).write_text("\n".join(tuning_table(rows, chosen)) + "\n")
    (sweep / "results.md").write_text("\n".join(
        discussion_link(sweep) + [RESULTS_HEADER, ""] + results_table(rows, chosen, planned)
        + ["", MAIN_HEADER, ""] + main_table(rows, chosen, complete)
        + ["", GAP_HEADER, ""] + method_gap_table(rows, chosen)
        + ["", COST_HEADER, ""] + privacy_cost_table(rows, chosen)
        + ["", RANK_HEADER, ""] + rank_table(rows, chosen, complete, planned)
        + ["", RANK_GAIN_HEADER, ""] + rank_gain_table(rows, chosen)
        + ["", RANK_GAP_HEADER, ""] + rank_method_gap_table(rows, chosen)) + "\n")
    final = {k: v for k, v in chosen.items() if k in complete}
    follow = sweep / f"{study['name']}_chosen.toml"  # generated: in the study folder
    if final:
        params_of = {c.name: c.params for c in cells(study, args.config.parent)}
        registered_seeds = (seeds_by_setting(registered(sweep))
                            if (sweep / PREREGISTRATION).is_file() else {})
        follow.write_text(follow_up(rebased(study, args.config.parent, sweep), final,
                                    params_of, registered_seeds, planned))
    else:  # a follow-up written before the grid grew would run unfinished choices
        follow.unlink(missing_ok=True)
    log.info("%d finished cells; %d settings chosen, %d of them final (%s): %s", len(rows),
             len(chosen), len(final), follow if final else "no follow-up sweep yet",
             sweep / "results.md")


if __name__ == "__main__":
    main()
