"""DP-LoRA local-step throughput against non-private LoRA, same model, batch and length.

For each model and method it times the step LocalTrainer takes (forward, backward,
gradient accumulation, optimizer step) in three modes: `plain` (no DP: the baseline),
`dp-hooks` (Opacus per-layer per-sample gradients, the default) and `dp-functorch`
(torch.func per-sample gradients), all with clipping and noise. Modes are interleaved in
repeats so machine noise hits them alike; the table gives median step times, records per
second, and the throughput ratio to `plain` measured in the same run. `--memory` also
measures each mode's peak memory: on CUDA `torch.cuda.max_memory_allocated` of the mode
alone, elsewhere the peak RSS of a fresh process.

Models (random init from configs unless named otherwise; the weights do not matter for
timing), each with its task's loss:
- sequence classification: `minilm` (the packaged all-MiniLM-L6-v2), `bert-base`,
  `gpt2-small`;
- causal LM: `gpt2-small-lm` (GPT-2 small with its tied LM head), `smollm2-lm`
  (SmolLM2-135M's shape: Llama, 30 layers, 576 wide, 49,152-token vocabulary);
- `tiny-bert`, `tiny-gpt2-lm`, `tiny-llama-lm`: 2-layer stand-ins for a quick dry run.

    python -m experiments.bench_dp_step [--models minilm,bert-base,gpt2-small]
        [--methods ffa,vanilla] [--batch 32] [--seq 64] [--steps 5] [--repeats 3]
        [--device auto|cpu|cuda] [--precision fp32|bf16] [--memory] [--json FILE]
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

from fed_dplora.config import DEFAULT_MODEL, LoraSpec, ModelSpec
from fed_dplora.dp.engine import (DpSgdAccumulator, DpSgdConfig, PlainAccumulator,
                                  wrap_for_per_sample_grads)
from fed_dplora.dp.noise import SeededRandom
from fed_dplora.lora.model import ModelRecipe, build_lora_model, resolve_device
from fed_dplora.tasks import task_for
from fed_dplora.site.trainer import make_optimizer, mixed_precision

log = logging.getLogger("fed_dplora.bench_dp_step")
MODES = ("plain", "dp-hooks", "dp-functorch")
CACHE = Path(tempfile.gettempdir()) / "fed-dplora-bench-models"
CLASSIFY, LM = "sequence-classification", "causal-lm"


def _configs() -> dict[str, tuple[str, object]]:
    """Model name -> (task, transformers model to save), built on demand."""
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, GPT2Model,
                              LlamaConfig, LlamaForCausalLM)
    smollm2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, max_position_embeddings=8192,
                          tie_word_embeddings=True, rope_theta=100000.0)
    tiny = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                intermediate_size=128, vocab_size=1000)
    return {
        "bert-base": (CLASSIFY, lambda: BertModel(BertConfig())),
        "gpt2-small": (CLASSIFY, lambda: GPT2Model(GPT2Config())),
        "gpt2-small-lm": (LM, lambda: GPT2LMHeadModel(GPT2Config())),
        "smollm2-lm": (LM, lambda: LlamaForCausalLM(smollm2)),
        "tiny-bert": (CLASSIFY, lambda: BertModel(BertConfig(**tiny))),
        "tiny-gpt2-lm": (LM, lambda: GPT2LMHeadModel(GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=1000))),
        "tiny-llama-lm": (LM, lambda: LlamaForCausalLM(LlamaConfig(
            **tiny, num_key_value_heads=2))),
    }


def model_recipe(name: str, method: str) -> ModelRecipe:
    if name == "minilm":
        return ModelRecipe(ModelSpec(DEFAULT_MODEL), LoraSpec(), method, 2, 0)
    configs = _configs()
    if name not in configs:
        raise SystemExit(f"--models: unknown {name!r}; known: minilm, {', '.join(configs)}")
    task, build = configs[name]
    folder = CACHE / name
    if not (folder / "config.json").exists():
        build().save_pretrained(folder)
    pooling = "last" if name == "gpt2-small" else "mean"
    return ModelRecipe(ModelSpec(str(folder), pooling=pooling), LoraSpec(), method,
                       2 if task == CLASSIFY else 0, 0, task)


class Stepper:
    """One mode's model, wrapper, accumulator and optimizer: `step()` is one local step."""

    def __init__(self, recipe: ModelRecipe, mode: str, device: torch.device, args) -> None:
        self.model = build_lora_model(recipe, device)
        self.task = task_for(recipe.task)
        self.forward = self.model
        if mode == "plain":
            self.accumulator = PlainAccumulator(self.model, args.batch)
        else:
            self.forward = wrap_for_per_sample_grads(self.model, device,
                                                     mode == "dp-functorch")
            self.accumulator = DpSgdAccumulator(
                self.forward, DpSgdConfig(1.0, 1.0, args.batch), SeededRandom(0, device))
        self.optimizer = make_optimizer(self.model, "sgd", 0.1)
        gen = torch.Generator().manual_seed(0)
        vocab = next(m for m in self.model.modules()
                     if isinstance(m, torch.nn.Embedding)).num_embeddings
        self.ids = torch.randint(5, vocab, (args.batch, args.seq), generator=gen).to(device)
        self.mask = torch.ones_like(self.ids)
        self.labels = (torch.randint(0, 2, (args.batch,), generator=gen).to(device)
                       if recipe.task == CLASSIFY else None)
        self.device, self.precision = device, args.precision

    def step(self) -> None:
        self.accumulator.begin()
        with mixed_precision(self.device, self.precision):
            logits = self.forward(self.ids, self.mask)
        self.task.loss_sum(logits, self.ids, self.mask, self.labels).backward()
        self.accumulator.add_physical_batch(self.ids.shape[0])
        self.accumulator.finish()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def time_modes(recipe: ModelRecipe, device: torch.device, args) -> dict[str, float]:
    """Median seconds per step of each mode, interleaved over repeats."""
    steppers = {m: Stepper(recipe, m, device, args) for m in MODES}
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


def peak_memory_mb(model: str, method: str, mode: str, device: torch.device, args) -> float:
    """Peak memory of `mode` alone: CUDA allocations, or a fresh process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        stepper = Stepper(model_recipe(model, method), mode, device, args)
        for _ in range(3):
            stepper.step()
        del stepper
        return torch.cuda.max_memory_allocated(device) / 2**20
    out = subprocess.run(
        [sys.executable, "-m", "experiments.bench_dp_step", "--rss-child", model, method,
         mode, "--batch", str(args.batch), "--seq", str(args.seq),
         "--precision", args.precision, "--device", args.device],
        capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def measure(model: str, method: str, device: torch.device, args) -> dict:
    """One table row: step times, records/s, ratios to plain, and peak memory."""
    t = time_modes(model_recipe(model, method), device, args)
    row = {"model": model, "method": method, "precision": args.precision,
           **{f"{m}_s": t[m] for m in MODES},
           "plain_records_per_s": args.batch / t["plain"],
           "hooks_records_per_s": args.batch / t["dp-hooks"],
           "hooks_over_plain": t["plain"] / t["dp-hooks"],
           "functorch_over_plain": t["plain"] / t["dp-functorch"]}
    if args.memory:
        plain = peak_memory_mb(model, method, "plain", device, args)
        hooks = peak_memory_mb(model, method, "dp-hooks", device, args)
        row.update(plain_peak_mb=plain, hooks_peak_mb=hooks, memory_ratio=hooks / plain)
    return row


def format_row(row: dict) -> str:
    line = (f"{row['model']:<14} {row['method']:<8} {row['precision']:<5} "
            f"{row['plain_s']:>9.4f} {row['dp-hooks_s']:>9.4f} {row['dp-functorch_s']:>9.4f} "
            f"{row['hooks_records_per_s']:>9.1f} {row['hooks_over_plain']:>11.3f} "
            f"{row['functorch_over_plain']:>15.3f}")
    if "memory_ratio" in row:
        line += (f" {row['plain_peak_mb']:>11.0f} {row['hooks_peak_mb']:>11.0f} "
                 f"{row['memory_ratio']:>10.3f}")
    return line


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base,gpt2-small")
    parser.add_argument("--methods", default="ffa,vanilla")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="forward passes in fp32, or under bf16 autocast (CUDA)")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--rss-child", nargs=3, metavar=("MODEL", "METHOD", "MODE"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    if args.rss_child:
        model, method, mode = args.rss_child
        stepper = Stepper(model_recipe(model, method), mode, device, args)
        for _ in range(3):
            stepper.step()
        print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                          / 1024}))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    log.info("device %s, torch %s, %d threads, batch %d x seq %d, LoRA r=8, %s, median of "
             "%d steps x %d interleaved repeats", device, torch.__version__,
             torch.get_num_threads(), args.batch, args.seq, args.precision, args.steps,
             args.repeats)
    header = (f"{'model':<14} {'method':<8} {'prec':<5} {'plain s':>9} {'hooks s':>9} "
              f"{'func s':>9} {'DP rec/s':>9} {'hooks/plain':>11} {'functorch/plain':>15}")
    if args.memory:
        header += f" {'plain MB':>11} {'hooks MB':>11} {'mem ratio':>10}"
    log.info("%s", header)
    rows = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            rows.append(measure(model, method, device, args))
            log.info("%s", format_row(rows[-1]))
    log.info("throughput ratios relative to plain LoRA (1.0 = DP costs nothing); memory "
             "ratio = DP-hooks peak / plain peak (%s)",
             "CUDA max_memory_allocated" if device.type == "cuda" else "process peak RSS")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
