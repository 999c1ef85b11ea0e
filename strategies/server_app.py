"""Flower ServerApp: run config -> specs -> census, privacy plan, rounds, run folder.

Round 0 asks every client for its training-set size and labels, so the server can pick
delta, calibrate each client's noise multiplier and build the model. Each round then
samples clients, stops before any client's sample-level epsilon would pass the target,
trains, charges the ledger with what clients report they used, evaluates on every
client's test split, and appends one metrics line.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sys
import time
from datetime import datetime

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fed_dplora import protocol as p
from fed_dplora.config import RunSpec, parse_run_config
from fed_dplora.data.sources import sorted_label_names
from fed_dplora.lora.adapters import lora_a_fingerprint, load_trainable_arrays, trainable_arrays
from fed_dplora.lora.model import ModelRecipe, build_lora_model
from fed_dplora.privacy.ledger import SampleLevelLedger
from fed_dplora.privacy.plan import SampleLevelPlan, plan_sample_level
from fed_dplora.results import RunFolder
from strategies.lora_fedavg import ClientFailure, LoraFedAvg, checked_replies, payload_bytes

log = logging.getLogger("fed_dplora.server")
app = ServerApp()
NODE_WAIT_S = 120
REPLY_TIMEOUT_S = 3600


@app.main()
def main(grid: Grid, context: Context) -> None:
    _configure_logging()
    _refuse_runtime_env()
    spec = parse_run_config(context.run_config)
    run = RunFolder.create(spec.output_dir, _run_name(spec, context.run_id), spec.to_dict())
    log.info("run folder: %s", run.path.resolve())
    nodes = _wait_for_nodes(grid, spec.clients_per_round)
    sizes, labels = _census(grid, nodes)
    run.write_json("config.json", {**spec.to_dict(), "label_names": list(labels)})
    plan = _privacy_plan(spec, sizes)
    model = build_lora_model(ModelRecipe.from_spec(spec, len(labels)), torch.device("cpu"))
    arrays = trainable_arrays(model)
    shared = {n: a for n, a in _lora_a_arrays(model).items() if n not in arrays}
    # Under vanilla A trains and travels; only FFA's frozen A must match everywhere.
    strategy = LoraFedAvg(lora_a_fingerprint(model) if spec.method == "ffa" else None,
                          shared)
    ledger = SampleLevelLedger(plan.delta) if plan else None
    run.write_json("privacy_plan.json", _plan_summary(spec, plan, sizes))
    rng = random.Random(spec.seed)
    for rnd in range(1, spec.num_server_rounds + 1):
        start = time.perf_counter()
        sampled = sorted(rng.sample(nodes, spec.clients_per_round))
        if plan and not _within_budget(ledger, plan, sampled, spec):
            break
        configs = {n: _round_config(spec, rnd, n, labels, plan) for n in sampled}
        replies = list(grid.send_and_receive(strategy.train_messages(arrays, configs),
                                             timeout=REPLY_TIMEOUT_S))
        result = strategy.aggregate_train(replies, sampled)
        if plan:
            _charge(ledger, plan, spec, result.client_metrics)
        arrays = result.arrays
        eval_config = ConfigRecord({p.WIRE: p.WIRE_VERSION, p.ROUND: rnd,
                                    p.LABEL_NAMES: list(labels)})
        eval_replies = list(grid.send_and_receive(
            strategy.evaluate_messages(arrays, nodes, eval_config), timeout=REPLY_TIMEOUT_S))
        loss, accuracy, _ = strategy.aggregate_evaluate(eval_replies, nodes)
        metrics = result.client_metrics.values()
        row = {
            "round": rnd, "eval_loss": loss, "eval_accuracy": accuracy,
            "train_loss": _mean(m[p.TRAIN_LOSS] for m in metrics),
            "clip_fraction": _mean(m[p.CLIP_FRACTION] for m in metrics),
            "epsilon_sample": ledger.max_epsilon() if ledger else None,
            "epsilon_client": None, "delta": plan.delta if plan else None,
            "bytes_up": result.bytes_up,
            "bytes_down": payload_bytes(arrays) * (len(sampled) + len(nodes)),
            "clients": [str(n) for n in sampled],
            "aggregation_error": result.aggregation_error,
            "wall_s": time.perf_counter() - start,
        }
        run.append_metrics(row)
        _log_round(row, spec.num_server_rounds)
    load_trainable_arrays(model, arrays)
    log.info("final adapter: %s", run.save_adapter(model))
    if ledger:
        run.write_json("privacy_ledger.json", {
            "delta": plan.delta, "epsilon_sample_max": ledger.max_epsilon(),
            "epsilon_per_client": ledger.per_client()})


def _census(grid: Grid, nodes: list[int]) -> tuple[dict[str, int], tuple[str, ...]]:
    """Ask every node for its training-set size and label values (round 0)."""
    config = ConfigRecord({p.WIRE: p.WIRE_VERSION})
    messages = [Message(RecordDict({p.CONFIG: config}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in nodes]
    replies = checked_replies(list(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S)),
                              nodes, "census")
    sizes, labels = {}, set()
    for reply in replies:
        config = reply.content[p.CONFIG]
        sizes[str(reply.metadata.src_node_id)] = int(config[p.NUM_TRAIN_EXAMPLES])
        labels |= set(config[p.LABEL_NAMES])
    empty = [n for n, size in sizes.items() if size == 0]
    if empty:
        raise ClientFailure(f"node(s) {empty} have no training records")
    if len(labels) < 2:
        raise ClientFailure(f"the federation's data has labels {sorted(labels)}; "
                            "classification needs at least two")
    return sizes, sorted_label_names(labels)


def _privacy_plan(spec: RunSpec, sizes: dict[str, int]) -> SampleLevelPlan | None:
    if not spec.privacy.enabled:
        log.warning("privacy.level=\"none\": training WITHOUT differential privacy")
        return None
    planned_steps = spec.num_server_rounds * spec.train.local_steps
    plan = plan_sample_level(spec.privacy.target_epsilon, spec.privacy.delta,
                             spec.train.batch_size, sizes, planned_steps)
    for client in sorted(sizes):
        log.info("client %s: n=%d q=%.4f sigma=%.4f (target eps=%g, delta=%.3g, %d steps)",
                 client, sizes[client], plan.sampling_probability[client],
                 plan.noise_multiplier[client], plan.target_epsilon, plan.delta,
                 planned_steps)
    return plan


def _within_budget(ledger: SampleLevelLedger, plan: SampleLevelPlan, sampled: list[int],
                   spec: RunSpec) -> bool:
    for node in map(str, sampled):
        after = ledger.epsilon_if(node, plan.sampling_probability[node],
                                  plan.noise_multiplier[node], spec.train.local_steps)
        if after > plan.target_epsilon:
            log.warning("stopping: another round would take client %s to epsilon %.4f > "
                        "target %g", node, after, plan.target_epsilon)
            return False
    return True


def _charge(ledger: SampleLevelLedger, plan: SampleLevelPlan, spec: RunSpec,
            client_metrics: dict[int, dict[str, float]]) -> None:
    """Record what each client reports it used; it must match what was asked."""
    for node, m in client_metrics.items():
        client = str(node)
        used = (m[p.SAMPLING_PROBABILITY], m[p.NOISE_MULTIPLIER], int(m[p.STEPS]))
        asked = (plan.sampling_probability[client], plan.noise_multiplier[client],
                 spec.train.local_steps)
        if any(abs(u - a) > 1e-9 * max(1.0, abs(a)) for u, a in zip(used, asked)):
            raise ClientFailure(f"node {node} used (q, sigma, steps)={used}, the server "
                                f"asked for {asked}: refusing an update the ledger "
                                "cannot account for")
        ledger.record(client, *used)


def _round_config(spec: RunSpec, rnd: int, node: int, labels: tuple[str, ...],
                  plan: SampleLevelPlan | None) -> ConfigRecord:
    digest = hashlib.sha256(f"{spec.seed}:{rnd}:{node}".encode()).digest()
    config = ConfigRecord({p.WIRE: p.WIRE_VERSION, p.ROUND: rnd,
                           p.ROUND_SEED: int.from_bytes(digest[:4], "little") >> 1,
                           p.LABEL_NAMES: list(labels)})
    if plan:
        config[p.NOISE_MULTIPLIER] = plan.noise_multiplier[str(node)]
    return config


def _wait_for_nodes(grid: Grid, needed: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_S
    while len(nodes := sorted(grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            raise ClientFailure(
                f"clients-per-round={needed} but only {len(nodes)} SuperNode(s) connected "
                f"after {NODE_WAIT_S} s; lower clients-per-round or start more "
                "(simulation: --federation-config 'num-supernodes=N')")
        time.sleep(1)
    return nodes


def _lora_a_arrays(model: torch.nn.Module) -> dict:
    return {n: t.detach().float().numpy() for n, t in model.named_parameters()
            if ".lora_A." in n}


def _plan_summary(spec: RunSpec, plan: SampleLevelPlan | None,
                  sizes: dict[str, int]) -> dict:
    if plan is None:
        return {"level": "none", "client_sizes": sizes}
    return {"level": spec.privacy.level, "unit": "one record of one client (add/remove)",
            "target_epsilon": plan.target_epsilon, "delta": plan.delta,
            "planned_steps_per_client": spec.num_server_rounds * spec.train.local_steps,
            "client_sizes": sizes, "sampling_probability": plan.sampling_probability,
            "noise_multiplier": plan.noise_multiplier,
            "max_grad_norm": spec.privacy.max_grad_norm}


def _log_round(row: dict, rounds: int) -> None:
    eps = "off" if row["epsilon_sample"] is None else f"{row['epsilon_sample']:.3f}"
    log.info("round %d/%d | eval_loss %.4f | eval_acc %.4f | eps_sample %s | "
             "up %.1f KB | down %.1f KB | agg_err %.2e | %.1f s",
             row["round"], rounds, row["eval_loss"], row["eval_accuracy"], eps,
             row["bytes_up"] / 1e3, row["bytes_down"] / 1e3, row["aggregation_error"],
             row["wall_s"])


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


def _run_name(spec: RunSpec, run_id: int) -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{spec.method}-{spec.privacy.level}-{run_id}"


def _configure_logging() -> None:
    """INFO for our loggers; Flower's root handler prints (and streams) them."""
    logging.getLogger("fed_dplora").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")


def _refuse_runtime_env() -> None:
    """Flower's per-run dependency re-install would swap torch under us: refuse it."""
    if "runtime-envs" in sys.prefix:
        raise RuntimeError(
            f"the ServerApp runs in Flower's per-run environment {sys.prefix}, not the "
            "installed one; set FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 before "
            "starting flwr / flower-superlink (installing fed-dplora sets it by default)")
