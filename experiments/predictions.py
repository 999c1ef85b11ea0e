"""Per-record test predictions of a finished simulation's final global model, saved in
its run folder (predictions.json), so that two arms run at one seed (same split, same
records) can be compared record by record.

    python -m experiments.predictions <run folder> [<run folder> ...]

The model is rebuilt from the run folder (config.json and adapter/), each simulated
site's test split is read as that site read it, and the file is written only if the
predictions' pooled accuracy equals the run's final federated test accuracy: the check
that these are the records and the model the run scored. Nothing crosses the wire for
this (a site sends only counts); it reads the study's own copy of the data, offline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from clients.client_app import EVAL_BATCH
from fed_dplora.data.site import SitePlacement, load_site
from fed_dplora.data.tokenize import tokenize
from fed_dplora.lora.model import load_tokenizer
from fed_dplora.run.results import RunFolder, load_final_model, read_metrics
from fed_dplora.site.trainer import predicted_classes

log = logging.getLogger("fed_dplora.predictions")
PREDICTIONS = "predictions.json"


class PredictionMismatch(RuntimeError):
    """The rebuilt model's predictions do not reproduce the run's final accuracy."""


def save_predictions(run_dir: Path) -> Path:
    """Write `run_dir`/predictions.json (site -> labels, predicted classes and a digest of
    the test texts, in the site's order), after checking it against metrics.jsonl."""
    run_dir = Path(run_dir)
    final = read_metrics(run_dir)[-1]
    sites = predictions_by_site(run_dir)
    correct = sum(a == b for s in sites.values() for a, b in zip(s["labels"], s["predicted"]))
    total = sum(len(s["labels"]) for s in sites.values())
    if not math.isclose(correct / total, final["eval_accuracy"], abs_tol=1e-9):
        raise PredictionMismatch(
            f"{run_dir}: the saved adapter's predictions score {correct}/{total} = "
            f"{correct / total:.6f} on the sites' test splits, the run reported "
            f"eval_accuracy {final['eval_accuracy']} in round {final['round']}: not "
            f"saved (is adapter/ from another run, or the data file changed?)")
    RunFolder(run_dir).write_text(PREDICTIONS, json.dumps(
        {"round": final["round"], "accuracy": correct / total, "sites": sites}) + "\n")
    return run_dir / PREDICTIONS


def predictions_by_site(run_dir: Path) -> dict[str, dict[str, Any]]:
    """site name -> {"records_sha256", "labels", "predicted"} under the final model."""
    model, spec, labels = load_final_model(run_dir)
    tokenizer = load_tokenizer(spec.model)
    names = list(json.loads((run_dir / "privacy_plan.json").read_text())["client_sizes"])
    out = {}
    for site in names:
        partition = _partition_of(site)
        test = load_site(spec, SitePlacement(partition, len(names))).test
        data = tokenize(test, tokenizer, spec.model.max_length, labels)
        out[site] = {"records_sha256": texts_digest(test.texts),
                     "labels": data.labels.tolist(),
                     "predicted": predicted_classes(model, data, EVAL_BATCH,
                                                    torch.device("cpu")).tolist()}
    return out


def _partition_of(site: str) -> int:
    prefix, _, number = site.rpartition("-")
    if prefix != "partition" or not number.isdigit():
        raise ValueError(f"site {site!r}: predictions are rebuilt for a simulation's sites "
                         "(partition-0, partition-1, ...); a deployed site keeps its "
                         "records, and its predictions, to itself")
    return int(number)


def texts_digest(texts: tuple[str, ...]) -> str:
    """SHA-256 over the records' texts in order: equal digests, the same records."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode() + b"\x1e")
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    for run_dir in args.run_dirs:
        log.info("%s", save_predictions(run_dir))


if __name__ == "__main__":
    main()
