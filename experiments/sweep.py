"""Run a grid of federated jobs through `flwr run`, one run folder per cell, resumable.

    python -m experiments.sweep experiments/configs/<name>.toml [--dry-run]

The TOML file:

    name = "cpu_sst2_glue"          # sweep folder: experiments/results/<name> unless `output`
    clients = 10                    # SuperNodes of the simulation; as a grid key it also
                                    # sets clients-per-round (every client, every round)
    cpus-per-client = 1             # Ray resources per simulated client
    gpus-per-client = 0.0           # fractional GPUs let several clients share one

    [base]                          # run-config keys every cell shares
    "data.path" = "../../data/sst2-glue"  # python -m fed_dplora.data prepare sst2-glue data/sst2-glue
    num-server-rounds = 10

    [grid]                          # every combination of these lists is one cell
    method = ["ffa", "vanilla"]
    privacy = ["none", 8.0, 3.0]    # shorthand: "none", or a sample-level target epsilon
    partition = ["iid", "dirichlet:0.5", "pathological:1"]   # shorthand, see PARTITIONS
    seed = [0, 1]

    [[extra]]                       # more cells: another grid over the same base
    grid = { "lora.rank" = [16], privacy = [8.0], method = ["ffa", "vanilla"] }

Relative paths in the file are relative to the file. Every cell runs the real ServerApp
and ClientApp. A cell whose run folder holds `summary.json` (written last by the
ServerApp) is skipped; a cell interrupted mid-run is continued from its checkpoint
(`resume=true`). Each finished classification cell gets its per-record test predictions
(predictions.json, experiments.predictions). Run folders' small files are meant to be
committed as cells land, so a study can span sessions; adapters and checkpoints stay out
of git.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.flwr_job import LocalFederation
from experiments.predictions import PREDICTIONS, PredictionMismatch, save_predictions
from fed_dplora.config import ConfigError, RunSpec, parse_run_config
from fed_dplora.config.methods import RENAMED, current_name

log = logging.getLogger("fed_dplora.sweep")
REPO = Path(__file__).resolve().parents[1]
SHORTHANDS = ("privacy", "partition", "clients")
CELLS = "cells"  # the sweep folder's subfolder with one run folder per cell
PARTITIONS = {"iid": {}, "dirichlet": "data.alpha", "pathological": "data.classes-per-client",
              "natural": "data.partition-column"}


@dataclass(frozen=True)
class Cell:
    name: str  # run folder name
    params: dict[str, Any]  # the grid values that define it (shorthands kept)
    run_config: dict[str, Any]  # resolved flat run config
    spec: RunSpec  # run_config, parsed and checked
    clients: int


class SweepError(ValueError):
    """The sweep file is malformed."""


def expand(params: dict[str, Any], base: dict[str, Any], clients: int) -> tuple[dict, int]:
    """Grid values (with shorthands) -> (flat run config, number of SuperNodes)."""
    config = dict(base)
    for key, value in params.items():
        if key == "privacy":
            if value == "none":
                config["privacy.level"] = "none"
            else:
                config["privacy.level"] = config.get("privacy.level", "sample")
                config["privacy.target-epsilon"] = float(value)
        elif key == "partition":
            kind, _, arg = str(value).partition(":")
            if kind not in PARTITIONS:
                raise SweepError(f"partition={value!r}: use one of {list(PARTITIONS)}, "
                                 "e.g. \"dirichlet:0.5\", \"pathological:1\", "
                                 "\"natural:site\"")
            config["data.partitioner"] = kind
            if PARTITIONS[kind]:
                if not arg:
                    raise SweepError(f"partition={value!r}: give {PARTITIONS[kind]} "
                                     f"after a colon, e.g. \"{kind}:...\"")
                config[PARTITIONS[kind]] = (arg if kind == "natural"
                                            else (float(arg) if kind == "dirichlet" else int(arg)))
        elif key == "clients":  # the simulation's size; every client takes part each round
            clients = int(value)
            config["clients-per-round"] = clients
        else:
            config[key] = value
    return config, clients


def cells(sweep: dict[str, Any], folder: Path) -> list[Cell]:
    base = {k: _resolve_path(k, v, folder) for k, v in sweep.get("base", {}).items()}
    grids = [sweep.get("grid", {})] + [extra.get("grid", {}) for extra in sweep.get("extra", [])]
    out, seen = [], set()
    for grid in grids:
        keys = list(grid)
        for values in itertools.product(*(_as_list(k, grid[k]) for k in keys)):
            params = dict(zip(keys, values))
            # a cell's name keeps the method as the study wrote it; its run, the name now
            run_params = {k: current_name(v) if k == "method" else v for k, v in params.items()}
            config, clients = expand(run_params, base, int(sweep.get("clients", 2)))
            name = "__".join(f"{k}={v}" for k, v in sorted(params.items())).replace("/", "-")
            if name in seen:
                continue
            seen.add(name)
            try:
                spec = parse_run_config(config)
            except ConfigError as err:
                raise SweepError(f"cell {name}: {err}") from err
            if spec.clients_per_round > clients:
                raise SweepError(f"cell {name}: clients-per-round={spec.clients_per_round} "
                                 f"exceeds the simulation's {clients} clients")
            out.append(Cell(name or "base", params, config, spec, clients))
    return out


def run_sweep(path: Path, dry_run: bool = False) -> Path:
    sweep = tomllib.loads(path.read_text())
    if "name" not in sweep:
        raise SweepError(f"{path}: set name = \"...\" (the sweep folder's name)")
    output = Path(sweep.get("output", REPO / "experiments" / "results" / sweep["name"]))
    output = output if output.is_absolute() else (path.parent / output).resolve()
    todo = cells(sweep, path.parent)
    runs = output / CELLS
    done = [c for c in todo if _finished(cell_folder(runs, c))]
    log.info("%s: %d cells, %d already finished", sweep["name"], len(todo), len(done))
    if dry_run:
        for cell in todo:
            log.info("%s %s (%d clients)", "done" if cell in done else "todo", cell.name,
                     cell.clients)
        return output
    runs.mkdir(parents=True, exist_ok=True)
    for cell in done:
        _predict(cell, cell_folder(runs, cell))
    _run_cells(sweep, [c for c in todo if c not in done], len(todo), runs)
    return output


def _run_cells(sweep: dict[str, Any], cells_left: list[Cell], total: int, runs: Path) -> None:
    """Run each unfinished cell (continuing an interrupted one), one federation per
    simulation size, then save its predictions."""
    from tqdm import tqdm

    progress = tqdm(total=total, initial=total - len(cells_left), desc=sweep["name"],
                    unit="cell")
    for clients in sorted({c.clients for c in cells_left}):
        with LocalFederation(clients, int(sweep.get("cpus-per-client", 1)),
                             float(sweep.get("gpus-per-client", 0.0))) as federation:
            for cell in (c for c in cells_left if c.clients == clients):
                progress.set_postfix_str(cell.name[-60:])
                folder = cell_folder(runs, cell)
                resume = (folder / "config.json").exists()
                federation.run({**cell.run_config, "output-dir": str(runs),
                                "run-name": folder.name, "resume": resume})
                _predict(cell, folder)
                progress.update(1)
    progress.close()


def cell_folder(runs: Path, cell: Cell) -> Path:
    """A cell's run folder: under its name, or, where a study ran it before its method
    was renamed, under the name with the method's earlier name."""
    folder = runs / cell.name
    method = cell.params.get("method")
    for old, (new, _why) in RENAMED.items():
        earlier = runs / cell.name.replace(f"method={new}", f"method={old}")
        if method == new and not folder.exists() and earlier.exists():
            return earlier
    return folder


def _predict(cell: Cell, folder: Path) -> None:
    """Save a finished classification cell's per-record test predictions, once (also for
    a cell finished by an earlier sweep that stopped before this step). A mismatch is
    logged and the file not written: one cell's check does not stop the study."""
    wanted = (cell.spec.task == "sequence-classification" and _finished(folder)
              and (folder / "adapter").is_dir() and not (folder / PREDICTIONS).exists())
    if not wanted:
        return
    try:
        save_predictions(folder)
    except PredictionMismatch as err:
        log.error("%s", err)


def _finished(folder: Path) -> bool:
    return (folder / "summary.json").is_file()  # the ServerApp writes it last


def finished_cells(sweep: Path) -> list[Path]:
    """The run folders of a sweep folder's finished cells, in name order."""
    return [folder for folder in sorted((sweep / CELLS).iterdir()) if _finished(folder)]


def partition_label(data: dict[str, Any]) -> str:
    """A cell's partition as the grid's shorthand names it ("iid", "dirichlet:0.5")."""
    if data["partitioner"] == "dirichlet":
        return f"dirichlet:{data['alpha']:g}"
    return data["partitioner"]


def _as_list(key: str, value: Any) -> list:
    if not isinstance(value, list) or not value:
        raise SweepError(f"grid key {key!r}: give a non-empty list, e.g. {key} = [..]")
    return value


def _resolve_path(key: str, value: Any, folder: Path) -> Any:
    if key in ("data.path", "model.name") and isinstance(value, str) and value.startswith("."):
        return str((folder / value).resolve())
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    output = run_sweep(args.config, args.dry_run)
    log.info("sweep folder: %s (report: python -m experiments.report %s)", output, output)


if __name__ == "__main__":
    main()
