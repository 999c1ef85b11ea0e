"""One command for a GPU machine: the DP-LoRA path proven and measured on CUDA.

    python -m experiments.gpu_check --out DIR [--device cuda] [--tiny]

Writes `DIR/gpu_check.json` (everything) and `DIR/gpu_check.md` (the tables), section by
section, so a run stopped at its time limit still leaves what it finished:

1. correctness on the device, in fp32 with TF32 off: the noise-free exactness of the
   clipped per-sample gradient (classification and causal LM, FFA and vanilla), and the
   guards: a model placed on the device after Opacus wrapped it, or after PEFT wrapped
   it, is refused; an optimizer over stale copies is refused; in the right order one
   noise-free DP round (bf16 autocast, as the trainer runs on CUDA) moves every
   trainable tensor and nothing else.
2. `experiments.bench_dp_step` rows for BERT-base, GPT-2-small (causal LM) and a
   SmolLM2-135M-shaped Llama, fp32 and bf16, FFA and vanilla: DP / plain throughput,
   records per second, and peak `torch.cuda.max_memory_allocated` of each mode.
3. N = 1, 2, 4, 8 client processes sharing the device (as fractional GPUs in a Ray
   simulation would), each running `LocalTrainer` DP rounds for the same wall time:
   total records per second and each client's peak memory.

`--tiny` swaps in 2-layer models and N = 1, 2 for a dry run on CPU (`--device cpu`).
On the GPU machine (Python 3.12, torch 2.11, transformers, peft; no opacus or
dp-accounting, no network) carry their wheels, as DEVELOPERS' device notes say:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 -d .whl \\
        opacus==1.6.0 dp-accounting==0.6.0 dm-tree==0.1.10
    # there:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 -m experiments.gpu_check --out $OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import fed_dplora.lora.model as model_module
from experiments.bench_dp_step import format_row, measure, model_recipe
from fed_dplora.data.tokenize import TokenizedData
from fed_dplora.dp import guards
from fed_dplora.dp.engine import DpSgdAccumulator, DpSgdConfig, wrap_for_per_sample_grads
from fed_dplora.dp.noise import SeededRandom
from fed_dplora.lora.model import ModelRecipe, build_lora_model, resolve_device
from fed_dplora.tasks import task_for
from fed_dplora.site.trainer import LocalTrainer, RoundPlan, make_optimizer

log = logging.getLogger("fed_dplora.gpu_check")
CPU = torch.device("cpu")
TINY = ("tiny-bert", "tiny-gpt2-lm", "tiny-llama-lm")
FULL = ("bert-base", "gpt2-small-lm", "smollm2-lm")
LENGTHS = (5, 2, 9, 3, 7, 1, 6, 4)  # records of different lengths: padding is exercised


def records(recipe: ModelRecipe, count: int, length: int | None, seed: int = 0
            ) -> TokenizedData:
    """Random token ids (and labels for classification): timing and exactness only."""
    gen = torch.Generator().manual_seed(seed)
    ids = tuple(torch.randint(5, 1000, (length or LENGTHS[i % len(LENGTHS)],), generator=gen)
                for i in range(count))
    labels = (torch.randint(0, 2, (count,), generator=gen)
              if recipe.task == "sequence-classification" else None)
    return TokenizedData(ids, labels, 0)


def exactness_error(recipe: ModelRecipe, device: torch.device) -> float:
    """Max |engine - hand| / max |hand| of the noise-free clipped mean gradient."""
    model = build_lora_model(recipe, device)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:  # B = 0 would give vanilla's A a zero gradient
                param.copy_((torch.randn(param.shape, generator=gen) * 0.5).to(device))
    for module in model.modules():  # train mode (Opacus needs it), but deterministic
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    task, data, clip = task_for(recipe.task), records(recipe, 8, None), 1e-2
    params = [p for p in model.parameters() if p.requires_grad]
    expected = [torch.zeros_like(p) for p in params]
    for i in range(len(data)):
        ids, mask, labels = data.batch([i], device)
        grads = torch.autograd.grad(task.loss_sum(model(ids, mask), ids, mask, labels),
                                    params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        for total, g in zip(expected, grads):
            total += g * (min(1.0, clip / norm) if norm > 0 else 1.0) / len(data)
    gsm = wrap_for_per_sample_grads(model, device)
    acc = DpSgdAccumulator(gsm, DpSgdConfig(0.0, clip, len(data)), SeededRandom(0, device))
    acc.begin()
    for lo in (0, 4):
        ids, mask, labels = data.batch(list(range(lo, lo + 4)), device)
        task.loss_sum(gsm(ids, mask), ids, mask, labels).backward()
        acc.add_physical_batch(4)
    acc.finish()
    scale = max(float(e.abs().max()) for e in expected)
    return max(float((p.grad - e).abs().max()) for p, e in zip(params, expected)) / scale


def refused(action) -> str | None:
    """The guard's message if `action` raised GuardError, else None."""
    try:
        action()
    except guards.GuardError as err:
        return str(err)[:160]
    return None


def guard_checks(recipe: ModelRecipe, device: torch.device) -> dict[str, object]:
    """Wrong orders refused, the right one moves exactly the trainable tensors. A CPU dry
    run stands "meta" in for the accelerator in the wrong-order cases."""
    target = torch.device("meta") if device.type == "cpu" else device
    built = model_module.build_base_model
    out = {"moved_after_opacus_refused": refused(
        lambda: wrap_for_per_sample_grads(build_lora_model(recipe, CPU), target))}
    model_module.build_base_model = lambda r, d: built(r, CPU)  # base left behind
    try:
        out["moved_after_peft_refused"] = refused(lambda: build_lora_model(recipe, target))
    finally:
        model_module.build_base_model = built
    model = build_lora_model(recipe, device)
    stale = make_optimizer(build_lora_model(recipe, device), "sgd", 0.1)
    out["stale_optimizer_refused"] = refused(
        lambda: guards.check_optimizer_holds_model_params(stale, model))
    trainer = LocalTrainer(recipe, device, private=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    plan = RoundPlan(2, 8, 4, 0.5, "sgd", 0.0, 1.0, seed=3)
    trainer.train({n: before[n].cpu().numpy() for n in trainable}, plan,
                  records(recipe, 32, None))
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    out["right_order_moves_exactly_the_trainable"] = moved == trainable
    out["trainable_tensors"] = len(trainable)
    return out


def correctness(device: torch.device, models: tuple[str, ...]) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name in models[:3]:
        for method in ("ffa", "vanilla"):
            recipe = model_recipe(_tiny_twin(name), method)
            row = {"model": _tiny_twin(name), "method": method,
                   "exactness_rel_error": exactness_error(recipe, device),
                   **guard_checks(recipe, device)}
            row["passed"] = (row["exactness_rel_error"] < 1e-4 and row[
                "right_order_moves_exactly_the_trainable"] and all(
                row[k] for k in ("moved_after_opacus_refused", "moved_after_peft_refused",
                                 "stale_optimizer_refused")))
            rows.append(row)
            log.info("correctness %s %s: %s", row["model"], method, row)
    return rows


def _tiny_twin(name: str) -> str:
    """Correctness runs on the 2-layer twin of each architecture (fast, same code)."""
    return {"bert-base": "tiny-bert", "gpt2-small-lm": "tiny-gpt2-lm",
            "smollm2-lm": "tiny-llama-lm"}.get(name, name)


def bench(device: torch.device, models: tuple[str, ...], tiny: bool) -> list[dict]:
    args = SimpleNamespace(batch=8 if tiny else 32, seq=16 if tiny else 128,
                           steps=2 if tiny else 3, repeats=1 if tiny else 2, memory=True,
                           device=device.type, precision="fp32")
    rows = []
    for model in models:
        for precision in ("fp32", "bf16"):
            for method in ("ffa", "vanilla"):
                args.precision = precision
                rows.append(measure(model, method, device, args))
                log.info("%s", format_row(rows[-1]))
    return rows


def share_worker(model: str, ready: Path, index: int, clients: int, duration: float,
                 device: torch.device, tiny: bool) -> dict:
    """One client process: warm up, wait for the others, train DP rounds for `duration`."""
    recipe = model_recipe(model, "ffa")
    trainer = LocalTrainer(recipe, device, private=True)
    batch = 8 if tiny else 32
    data = records(recipe, 64 * batch, 16 if tiny else 128, seed=index)
    plan = RoundPlan(5, batch, batch, 0.1, "sgd", 1.0, 1.0, seed=index)
    arrays, _ = trainer.train(_trainable(trainer), plan, data)  # warm-up round
    (ready / str(index)).touch()
    while len(list(ready.iterdir())) < clients:
        time.sleep(0.05)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, rounds = time.perf_counter(), 0
    while time.perf_counter() - start < duration:
        arrays, _ = trainer.train(arrays, plan, data)
        rounds += 1
    elapsed = time.perf_counter() - start
    memory = (torch.cuda.max_memory_allocated(device) / 2**20
              if device.type == "cuda" else float("nan"))
    return {"rounds": rounds, "seconds": elapsed,
            "records_per_s": rounds * plan.local_steps * batch / elapsed,
            "peak_mb": memory}


def _trainable(trainer: LocalTrainer) -> dict:
    return {n: p.detach().cpu().numpy() for n, p in trainer.model.named_parameters()
            if p.requires_grad}


def sharing(device: torch.device, model: str, counts: tuple[int, ...], duration: float,
            work: Path, tiny: bool) -> list[dict]:
    """N processes on one device at once: total throughput and memory per client."""
    rows = []
    for clients in counts:
        ready = work / f"ready-{clients}"
        ready.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "experiments.gpu_check", "--share-worker", model,
                   "--ready", str(ready), "--clients", str(clients), "--duration",
                   str(duration), "--device", device.type] + (["--tiny"] if tiny else [])
        procs = [subprocess.Popen(command + ["--index", str(i)], stdout=subprocess.PIPE,
                                  text=True) for i in range(clients)]
        results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        total = sum(r["records_per_s"] for r in results)
        rows.append({"clients": clients, "model": model, "total_records_per_s": total,
                     "per_client_records_per_s": [r["records_per_s"] for r in results],
                     "per_client_peak_mb": [r["peak_mb"] for r in results]})
        rows[-1]["speedup_vs_1"] = total / rows[0]["total_records_per_s"]
        log.info("sharing: %s", rows[-1])
    return rows


def write(out: Path, results: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = [f"# gpu_check on {results['device_name']} ({results['date']})", "",
             f"torch {results['torch']}; {results.get('elapsed_s', 0):.0f} s so far", ""]
    lines += ["## Correctness", "", "| model | method | exact rel err | refused: after "
              "Opacus / after PEFT / stale optimizer | right order moves exactly "
              "trainable | passed |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['exactness_rel_error']:.1e} | "
              f"{bool(r['moved_after_opacus_refused'])} / {bool(r['moved_after_peft_refused'])}"
              f" / {bool(r['stale_optimizer_refused'])} | "
              f"{r['right_order_moves_exactly_the_trainable']} | {r['passed']} |"
              for r in results.get("correctness", [])]
    lines += ["", "## DP step vs plain LoRA", "", "```"]
    lines += [format_row(r) for r in results.get("bench", [])] + ["```", "", "## Sharing"]
    lines += ["", "| clients | total records/s | speed-up vs 1 | peak MB per client |",
              "|---|---|---|---|"]
    lines += [f"| {r['clients']} | {r['total_records_per_s']:.1f} | {r['speedup_vs_1']:.2f} | "
              f"{max(r['per_client_peak_mb']):.0f} |" for r in results.get("sharing", [])]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def run_all(args: argparse.Namespace, device: torch.device) -> dict:
    models = TINY if args.tiny else FULL
    started = time.perf_counter()
    results = {"device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                               else "cpu"),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    sections = (("correctness", lambda: correctness(device, models)),
                ("bench", lambda: bench(device, models, args.tiny)),
                ("sharing", lambda: sharing(device, models[0], (1, 2) if args.tiny
                                            else (1, 2, 4, 8), args.duration,
                                            args.out / "work", args.tiny)))
    for name, section in sections:
        results[name] = section()
        results["elapsed_s"] = time.perf_counter() - started
        write(args.out, results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu", "auto"))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds each sharing configuration trains")
    parser.add_argument("--share-worker", metavar="MODEL")
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--clients", type=int, default=1)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.share_worker:
        print(json.dumps(share_worker(args.share_worker, args.ready, args.index,
                                      args.clients, args.duration, device, args.tiny)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run_all(args, device)
    failed = [r for r in results["correctness"] if not r["passed"]]
    log.info("done in %.0f s; %d correctness case(s) failed", results["elapsed_s"],
             len(failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
