"""The run folder: config.json, metrics.jsonl (one line per round) and adapter/.

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
        path = Path(output_dir) / run_name
        path.mkdir(parents=True, exist_ok=False)
        folder = cls(path)
        folder.write_json("config.json", config)
        return folder

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path / name)

    def append_metrics(self, row: dict[str, Any]) -> None:
        with (self.path / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
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


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def load_final_model(run_dir: str | Path, device: torch.device | None = None
                     ) -> tuple[PeftModel, RunSpec, tuple[str, ...]]:
    """The run's final global model (base + saved adapter), its spec and label names."""
    config = json.loads((Path(run_dir) / "config.json").read_text())
    labels = tuple(config.pop("label_names"))
    spec = RunSpec.from_dict(config)
    recipe = ModelRecipe.from_spec(spec, len(labels))
    model = load_adapter(recipe, Path(run_dir) / "adapter", device or torch.device("cpu"))
    return model, spec, labels
