"""Where a DP-LoRA step's time goes beyond plain LoRA's, by kind of trained tensor.

    python -m experiments.profile_dp_step [--model minilm] [--methods ffa,vanilla]
        [--batch 32] [--seq 64] [--steps 10] [--repeats 3]

For each method, plain and DP-hooks steps (`experiments.bench_dp_step`'s `Stepper`) run
interleaved; the table gives their median step times and, inside the DP step, the
seconds per step spent in Opacus' per-sample gradient einsums (LoRA A, LoRA B, the
rest: head, Frozen-AB-R's R), in Opacus' copy of each into its per-sample buffer, in our
clipping and clipped sum (`DpSgdAccumulator.add_physical_batch`) and in the noise
(`finish`). What is left of the DP step's excess over plain is the activation capture
and the hooks' own Python.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import opacus.grad_sample.grad_sample_module as gsm
import torch
from opacus.grad_sample import GradSampleModule

from experiments.bench_dp_step import Stepper, model_recipe
from fed_dplora.dp.engine import DpSgdAccumulator

log = logging.getLogger("fed_dplora.profile_dp_step")
PARTS = ("A einsum", "B einsum", "other einsum", "buffer copy", "clip+sum", "noise")


class PartTimer:
    """Seconds per named part, accumulated while `watching` is on."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.watching = False

    def wrap(self, part: Callable[..., str] | str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.watching:
                    name = part(*args, **kwargs) if callable(part) else part
                    self.seconds[name] += time.perf_counter() - start
        return timed


def tensor_kind(names: dict[int, str]) -> Callable[..., str]:
    def kind(layer, *_args, **_kwargs) -> str:
        name = names.get(id(layer), "")
        return ("A einsum" if "lora_A" in name else "B einsum" if "lora_B" in name
                else "other einsum")
    return kind


@contextmanager
def instrumented(timer: PartTimer, model: torch.nn.Module) -> Iterator[None]:
    """Time Opacus' Linear grad sampler, its buffer copy and our accumulator."""
    names = {id(m): n for n, m in model.named_modules()}
    saved = (GradSampleModule.GRAD_SAMPLERS[torch.nn.Linear],
             gsm.create_or_accumulate_grad_sample, DpSgdAccumulator.add_physical_batch,
             DpSgdAccumulator.finish)
    GradSampleModule.GRAD_SAMPLERS[torch.nn.Linear] = timer.wrap(tensor_kind(names),
                                                                  saved[0])
    gsm.create_or_accumulate_grad_sample = timer.wrap("buffer copy", saved[1])
    DpSgdAccumulator.add_physical_batch = timer.wrap("clip+sum", saved[2])
    DpSgdAccumulator.finish = timer.wrap("noise", saved[3])
    try:
        yield
    finally:
        (GradSampleModule.GRAD_SAMPLERS[torch.nn.Linear], gsm.create_or_accumulate_grad_sample,
         DpSgdAccumulator.add_physical_batch, DpSgdAccumulator.finish) = saved


def profile(method: str, args) -> dict[str, float]:
    """Median plain and DP step seconds, and the DP step's parts in seconds per step."""
    recipe, cpu = model_recipe(args.model, method), torch.device("cpu")
    plain, dp = Stepper(recipe, "plain", cpu, args), Stepper(recipe, "dp-hooks", cpu, args)
    timer = PartTimer()
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    with instrumented(timer, dp.model):
        plain.step(), dp.step()  # warm-up
        for _ in range(args.repeats):
            for mode, stepper in (("plain", plain), ("dp", dp)):
                timer.watching = mode == "dp"
                for _ in range(args.steps):
                    start = time.perf_counter()
                    stepper.step()
                    times[mode].append(time.perf_counter() - start)
    dp_steps = args.repeats * args.steps
    return {"plain": statistics.median(times["plain"]), "dp": statistics.median(times["dp"]),
            **{part: timer.seconds[part] / dp_steps for part in PARTS}}


def report(rows: dict[str, dict[str, float]]) -> None:
    log.info("%-8s %8s %8s %8s %s", "method", "plain s", "DP s", "excess",
             " ".join(f"{p:>12}" for p in PARTS))
    for method, row in rows.items():
        log.info("%-8s %8.4f %8.4f %8.4f %s", method, row["plain"], row["dp"],
                 row["dp"] - row["plain"], " ".join(f"{row[p]:>12.4f}" for p in PARTS))
    log.info("plain / DP throughput: %s", ", ".join(
        f"{m} {r['plain'] / r['dp']:.3f}" for m, r in rows.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--methods", default="ffa,vanilla")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.precision = "fp32"
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    log.info("%s, batch %d x seq %d, %d torch threads, median of %d steps x %d "
             "interleaved repeats; parts in seconds per DP step", args.model, args.batch,
             args.seq, torch.get_num_threads(), args.steps, args.repeats)
    report({m: profile(m, args) for m in args.methods.split(",")})


if __name__ == "__main__":
    main()
