"""DP-LoRA local-step throughput against non-private LoRA, same model, batch and length.

For each model and method it times the step LocalTrainer takes (forward, backward,
gradient accumulation, optimizer step) in three modes: `plain` (no DP: the baseline),
`dp-hooks` (Opacus per-layer per-sample gradients, the default) and `dp-functorch`
(torch.func per-sample gradients), all with clipping and noise. Modes are interleaved in
repeats so machine noise hits them alike; the table gives median step times and the
throughput ratio to `plain` measured in the same run. `--memory` also measures each
mode's peak RSS in a fresh process.

Models: the packaged all-MiniLM-L6-v2, and random-init BERT-base and GPT-2-small built
from their default configs (offline; the weights do not matter for timing).

    python -m experiments.bench_dp_step [--models minilm,bert-base,gpt2-small]
        [--methods ffa,vanilla] [--batch 32] [--seq 64] [--steps 5] [--repeats 3] [--memory]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fed_dplora.config import DEFAULT_MODEL, LoraSpec, ModelSpec
from fed_dplora.dp.engine import (DpSgdAccumulator, DpSgdConfig, PlainAccumulator,
                                  wrap_for_per_sample_grads)
from fed_dplora.dp.noise import SeededRandom
from fed_dplora.lora.model import ModelRecipe, build_lora_model, resolve_device
from fed_dplora.train import make_optimizer

log = logging.getLogger("fed_dplora.bench_dp_step")
MODES = ("plain", "dp-hooks", "dp-functorch")
CACHE = Path(tempfile.gettempdir()) / "fed-dplora-bench-models"


def model_recipe(name: str, method: str) -> ModelRecipe:
    if name == "minilm":
        return ModelRecipe(ModelSpec(DEFAULT_MODEL), LoraSpec(), method, 2, 0)
    folder = CACHE / name
    if not (folder / "config.json").exists():
        from transformers import BertConfig, BertModel, GPT2Config, GPT2Model
        model = BertModel(BertConfig()) if name == "bert-base" else GPT2Model(GPT2Config())
        model.save_pretrained(folder)
    if name == "bert-base":
        return ModelRecipe(ModelSpec(str(folder)), LoraSpec(), method, 2, 0)
    return ModelRecipe(ModelSpec(str(folder), pooling="last"),
                       LoraSpec(target_modules=("c_attn",)), method, 2, 0)


class Stepper:
    """One mode's model, wrapper, accumulator and optimizer: `step()` is one local step."""

    def __init__(self, recipe: ModelRecipe, mode: str, device: torch.device, batch: int,
                 seq: int) -> None:
        self.model = build_lora_model(recipe, device)
        self.forward = self.model
        if mode == "plain":
            self.accumulator = PlainAccumulator(self.model, batch)
        else:
            self.forward = wrap_for_per_sample_grads(self.model, device,
                                                     mode == "dp-functorch")
            self.accumulator = DpSgdAccumulator(self.forward, DpSgdConfig(1.0, 1.0, batch),
                                                SeededRandom(0, device))
        self.optimizer = make_optimizer(self.model, "sgd", 0.1)
        gen = torch.Generator().manual_seed(0)
        vocab = self.model.base_model.model.backbone.get_input_embeddings().num_embeddings
        self.ids = torch.randint(5, vocab, (batch, seq), generator=gen).to(device)
        self.mask = torch.ones_like(self.ids)
        self.labels = torch.randint(0, 2, (batch,), generator=gen).to(device)
        self.device = device

    def step(self) -> None:
        self.accumulator.begin()
        loss = F.cross_entropy(self.forward(self.ids, self.mask), self.labels,
                               reduction="sum")
        loss.backward()
        self.accumulator.add_physical_batch(self.ids.shape[0])
        self.accumulator.finish()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def time_modes(recipe: ModelRecipe, device: torch.device, args) -> dict[str, float]:
    """Median seconds per step of each mode, interleaved over repeats."""
    steppers = {m: Stepper(recipe, m, device, args.batch, args.seq) for m in MODES}
    for stepper in steppers.values():
        stepper.step()  # warm-up
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode, stepper in steppers.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                stepper.step()
                times[mode].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def peak_rss_mb(model: str, method: str, mode: str, args) -> float:
    """Peak RSS of a fresh process that builds `mode` and takes steps."""
    out = subprocess.run(
        [sys.executable, "-m", "experiments.bench_dp_step", "--rss-child", model, method,
         mode, "--batch", str(args.batch), "--seq", str(args.seq)],
        capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base,gpt2-small")
    parser.add_argument("--methods", default="ffa,vanilla")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--rss-child", nargs=3, metavar=("MODEL", "METHOD", "MODE"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.rss_child:
        model, method, mode = args.rss_child
        stepper = Stepper(model_recipe(model, method), mode, device, args.batch, args.seq)
        for _ in range(3):
            stepper.step()
        print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                          / 1024}))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    log.info("device %s, torch %s, %d threads, batch %d x seq %d, LoRA r=8, median of "
             "%d steps x %d interleaved repeats", device, torch.__version__,
             torch.get_num_threads(), args.batch, args.seq, args.steps, args.repeats)
    header = (f"{'model':<11} {'method':<8} {'plain s/step':>12} {'hooks s/step':>12} "
              f"{'functorch':>10} {'hooks/plain':>11} {'functorch/plain':>15}")
    if args.memory:
        header += f" {'RSS plain MB':>12} {'RSS hooks/plain':>15}"
    log.info("%s", header)
    for model in args.models.split(","):
        for method in args.methods.split(","):
            t = time_modes(model_recipe(model, method), device, args)
            line = (f"{model:<11} {method:<8} {t['plain']:>12.4f} {t['dp-hooks']:>12.4f} "
                    f"{t['dp-functorch']:>10.4f} {t['plain'] / t['dp-hooks']:>11.3f} "
                    f"{t['plain'] / t['dp-functorch']:>15.3f}")
            if args.memory:
                plain = peak_rss_mb(model, method, "plain", args)
                hooks = peak_rss_mb(model, method, "dp-hooks", args)
                line += f" {plain:>12.0f} {hooks / plain:>15.3f}"
            log.info("%s", line)
    log.info("ratios are throughput relative to plain LoRA (1.0 = DP costs nothing)")


if __name__ == "__main__":
    main()
