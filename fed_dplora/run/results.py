"""The run folder: config.json, per-round metrics.jsonl and samples.jsonl, adapter/, reports.

Every file appears whole or not at all: written beside its target, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from fed_dplora.config import RunSpec
from fed_dplora.lora.model import ModelRecipe, load_adapter


class RunFolder:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, output_dir: str | Path, run_name: str, config: dict[str, Any]
               ) -> "RunFolder":
        """A new run folder with its config.json, created whole (tmp folder, rename)."""
        path = Path(output_dir) / run_name
        if path.exists():
            raise FileExistsError(f"run folder {path} exists: set resume=true to continue "
                                  "it, or choose another run-name")
        tmp = Path(output_dir) / f".{run_name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as err:
            raise OSError(f"output-dir={str(output_dir)!r}: cannot create a run folder there "
                          f"({err.strerror}); choose a folder this process can write") from err
        cls(tmp).write_json("config.json", config)
        os.replace(tmp, path)
        return cls(path)

    @classmethod
    def open(cls, output_dir: str | Path, run_name: str) -> "RunFolder":
        path = Path(output_dir) / run_name
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"resume: {path} is not a run folder (no config.json); "
                                    "check output-dir and run-name")
        return cls(path)

    def read_json(self, name: str) -> dict[str, Any]:
        return json.loads((self.path / name).read_text())

    def truncate_rounds(self, last_round: int) -> None:
        """Keep the rows up to `last_round` in every per-round file (metrics.jsonl,
        samples.jsonl): rows of a round a crash left uncommitted are dropped before that
        round runs again, so a resumed run writes each round's rows once."""
        for path in sorted(self.path.glob("*.jsonl")):
            rows = [r for r in _read_jsonl(path) if r["round"] <= last_round]
            self.write_text(path.name, "".join(map(_jsonl_line, rows)))

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        self.write_text(name, json.dumps(payload, indent=2, sort_keys=True) + "\n")

    def write_text(self, name: str, text: str) -> None:
        """Written beside its target, flushed to disk and renamed into place: a crash
        leaves the old file or the new one, never part of one."""
        tmp = self.path / f".{name}.tmp"
        with tmp.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path / name)

    def append_metrics(self, row: dict[str, Any]) -> None:
        self.append_jsonl("metrics.jsonl", row)

    def append_jsonl(self, name: str, row: dict[str, Any]) -> None:
        """One JSON line, flushed to disk before returning."""
        with (self.path / name).open("a") as handle:
            handle.write(_jsonl_line(row))
            handle.flush()
            os.fsync(handle.fileno())

    def save_adapter(self, model: nn.Module) -> Path:
        """PEFT `save_pretrained` into a temporary folder, then rename to adapter/."""
        target, tmp = self.path / "adapter", self.path / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target


def _jsonl_line(row: dict[str, Any]) -> str:
    """One row of a per-round file, as appended and as rewritten on resume."""
    return json.dumps(row, sort_keys=True) + "\n"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The training rounds' rows of metrics.jsonl (rounds 1, 2, ...)."""
    return [r for r in _read_jsonl(Path(run_dir) / "metrics.jsonl") if r["round"] > 0]


def read_base_score(run_dir: str | Path) -> dict[str, Any] | None:
    """metrics.jsonl's round 0: the base model evaluated before any training (None where
    the run has not reached it)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = _read_jsonl(path) if path.exists() else []
    return next((r for r in rows if r["round"] == 0), None)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_final_model(run_dir: str | Path, device: torch.device | None = None
                     ) -> tuple[PeftModel, RunSpec, tuple[str, ...]]:
    """The run's final global model (base + saved adapter), its spec and label names."""
    config = json.loads((Path(run_dir) / "config.json").read_text())
    labels = tuple(config.pop("label_names"))
    spec = RunSpec.from_dict(config)
    recipe = ModelRecipe.from_spec(spec, len(labels))
    model = load_adapter(recipe, Path(run_dir) / "adapter", device or torch.device("cpu"))
    return model, spec, labels
