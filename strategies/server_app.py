"""Flower ServerApp: run config -> specs -> census, privacy plan, rounds, run folder.

Round 0 asks every client for its stable site id, training-set size and labels, so the
server can pick delta, calibrate the noise and build the model. Each round then samples
sites, stops before any reported epsilon would pass its target, trains, charges the
central accountant with what was really used, aggregates (FedAvg, or DP-FedAvg at
client level), evaluates on every client's test split, appends one metrics line and
checkpoints. `resume=true` continues a run folder from its last checkpoint.

Randomness: site sampling, round seeds and the server's DP-FedAvg noise are derived
from (seed, round), so a resumed run replays exactly. With secure noise (the default
outside simulation) clients draw sampling and noise from the OS CSPRNG and the server
its DP-FedAvg noise too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fed_dplora import protocol as p
from fed_dplora.checkpoint import Checkpoint
from fed_dplora.config import RunSpec, parse_run_config
from fed_dplora.data.sources import sorted_label_names
from fed_dplora.dp.noise import random_source
from fed_dplora.lora.adapters import lora_a_fingerprint, load_trainable_arrays, trainable_arrays
from fed_dplora.lora.model import ModelRecipe, build_lora_model
from fed_dplora.privacy.central import CentralAccountant, plan_privacy
from fed_dplora.privacy.plan import PrivacyPlan
from fed_dplora.results import RunFolder
from strategies.client_level_dp import DpFedAvg
from strategies.lora_fedavg import ClientFailure, LoraFedAvg, checked_replies, payload_bytes

log = logging.getLogger("fed_dplora.server")
app = ServerApp()
NODE_WAIT_S = 120
REPLY_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Census:
    node_of: dict[str, int]  # site id -> this run's Flower node id
    sizes: dict[str, int]  # site id -> training records
    labels: tuple[str, ...]

    @property
    def sites(self) -> list[str]:
        return sorted(self.sizes)

    def as_dict(self) -> dict:
        return {"sizes": self.sizes, "labels": list(self.labels)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.perf_counter()
    _configure_logging()
    _refuse_runtime_env()
    spec = parse_run_config(context.run_config)
    secure = _secure_noise(spec, grid)
    nodes = _wait_for_nodes(grid, spec.clients_per_round)
    census = _census(grid, nodes)
    census_s = time.perf_counter() - started
    run, checkpoint = _open_run(spec, context.run_id, census)
    plan = plan_privacy(spec, census.sizes)
    _log_plan(spec, plan, census, secure)
    model = build_lora_model(ModelRecipe.from_spec(spec, len(census.labels)),
                             torch.device("cpu"))
    arrays = trainable_arrays(model)
    shared = {n: a for n, a in _lora_a_arrays(model).items() if n not in arrays}
    # Under vanilla A trains and travels; only FFA's frozen A must match everywhere.
    fingerprint = lora_a_fingerprint(model) if spec.method == "ffa" else None
    strategy = (DpFedAvg(fingerprint, shared, plan.client) if plan.client
                else LoraFedAvg(fingerprint, shared))
    accountant = CentralAccountant(plan, spec.train.local_steps)
    log.info("set-up %.1f s: nodes and census %.1f s (clients start and load "
             "their data), privacy plan and model %.1f s", time.perf_counter() - started,
             census_s, time.perf_counter() - started - census_s)
    state = Checkpoint(0, arrays, {}, census.as_dict())
    run.write_json("privacy_plan.json", _plan_summary(spec, plan, census, secure))
    if checkpoint:
        state = _restore(checkpoint, accountant, secure)
        arrays = state.arrays

    for rnd in range(state.round + 1, spec.num_server_rounds + 1):
        if state.stopped:
            break
        start = time.perf_counter()
        sampled = _sample_sites(spec, census.sites, rnd)
        refusal = accountant.refusal(sampled)
        if refusal:
            log.warning("stopping before round %d: %s", rnd, refusal)
            state.stopped = f"budget: stopped before round {rnd}: {refusal}"
            break
        # Write-ahead: a crash from here on leaves a record of the round in flight.
        state.pending = {"round": rnd, "sample_charges":
                         accountant.planned_sample_charges(sampled)}
        state.ledgers = accountant.state()
        state.save(run.path)
        configs = {census.node_of[s]: _round_config(spec, rnd, s, census.labels, plan,
                                                    secure) for s in sampled}
        replies = list(grid.send_and_receive(strategy.train_messages(arrays, configs),
                                             timeout=REPLY_TIMEOUT_S))
        round_rng = random_source(secure, _derived_seed(spec.seed, rnd, "server-noise"))
        result = strategy.aggregate_train(replies, sorted(configs), arrays, round_rng)
        site_of = {node: site for site, node in census.node_of.items()}
        accountant.charge_sample({
            site_of[node]: (m[p.SAMPLING_PROBABILITY], m[p.NOISE_MULTIPLIER], int(m[p.STEPS]))
            for node, m in result.client_metrics.items()})
        accountant.charge_client_round()
        arrays = result.arrays
        loss, accuracy = _evaluate(grid, strategy, arrays, nodes, rnd, census.labels)
        metrics = result.client_metrics.values()
        row = {
            "round": rnd, "eval_loss": loss, "eval_accuracy": accuracy,
            "train_loss": _mean(m[p.TRAIN_LOSS] for m in metrics),
            "clip_fraction": _mean(m[p.CLIP_FRACTION] for m in metrics),
            "update_clip_fraction": result.update_clip_fraction,
            "epsilon_sample": accountant.epsilon_sample(),
            "epsilon_client": accountant.epsilon_client(),
            "delta": plan.sample.delta if plan.sample else None,
            "delta_client": plan.client.delta if plan.client else None,
            "bytes_up": result.bytes_up,
            "bytes_down": payload_bytes(arrays) * (len(sampled) + len(nodes)),
            "clients": sampled,
            "aggregation_error": result.aggregation_error,
            "wall_s": time.perf_counter() - start,
        }
        run.append_metrics(row)
        state = Checkpoint(rnd, arrays, accountant.state(), census.as_dict(),
                           lost_rounds=state.lost_rounds)
        state.save(run.path)
        _log_round(row, spec.num_server_rounds)

    state.ledgers = accountant.state()
    state.save(run.path)
    load_trainable_arrays(model, arrays)
    log.info("final adapter: %s", run.save_adapter(model))
    if plan.enabled:
        report = {**accountant.report(census.sites), "secure_noise": secure,
                  "rounds_completed": state.round, "lost_rounds": state.lost_rounds,
                  "stopped": state.stopped}
        run.write_json("privacy_report.json", report)
        log.info("privacy report: %s", run.path / "privacy_report.json")
    # Written last: its presence means the run finished and every other file is final.
    run.write_json("summary.json", {
        "finished": True, "rounds_completed": state.round, "stopped": state.stopped,
        "epsilon_sample": accountant.epsilon_sample(),
        "epsilon_client": accountant.epsilon_client(),
        "wall_s": time.perf_counter() - started})


def _open_run(spec: RunSpec, run_id: int, census: Census
              ) -> tuple[RunFolder, Checkpoint | None]:
    name = spec.run_name or _run_name(spec, run_id)
    if not spec.resume:
        run = RunFolder.create(spec.output_dir, name,
                               {**spec.to_dict(), "label_names": list(census.labels)})
        log.info("run folder: %s (continue it after a crash with resume=true "
                 "run-name=\"%s\")", run.path.resolve(), name)
        return run, None
    run = RunFolder.open(spec.output_dir, name)
    saved = run.read_json("config.json")
    saved.pop("label_names", None)
    ours = json.loads(json.dumps({**spec.to_dict(), "resume": saved.get("resume")}))
    if saved != ours:
        changed = sorted(k for k in ours if saved.get(k) != ours[k])
        raise ValueError(f"resume: run-config differs from {run.path}/config.json in "
                         f"{changed}; a resumed run must use the same configuration")
    if not Checkpoint.exists(run.path):
        # The write-ahead checkpoint precedes any training: nothing was spent yet.
        log.info("resuming %s from the start: it has no checkpoint yet", run.path.resolve())
        return run, None
    checkpoint = Checkpoint.load(run.path)
    if checkpoint.census != census.as_dict():
        raise ClientFailure(f"resume: the connected sites {census.as_dict()} differ from "
                            f"those the run was planned for {checkpoint.census}")
    run.truncate_metrics(checkpoint.round)
    log.info("resuming %s after round %d", run.path.resolve(), checkpoint.round)
    return run, checkpoint


def _restore(checkpoint: Checkpoint, accountant: CentralAccountant, secure: bool
             ) -> Checkpoint:
    """Ledgers from the checkpoint; a round lost in flight is charged when it may have
    leaked (secure noise: its fresh draws reached the server and will not repeat)."""
    accountant.restore(checkpoint.ledgers)
    pending = checkpoint.pending
    if pending and pending["round"] > checkpoint.round:
        if secure:
            accountant.charge_planned(pending["sample_charges"])
            checkpoint.lost_rounds.append(pending["round"])
            log.warning("round %d was interrupted after clients were asked to train; its "
                        "sample-level cost is charged and the round runs again",
                        pending["round"])
        else:
            log.info("round %d was interrupted; replaying it with the same seeds",
                     pending["round"])
        checkpoint.pending = None
    return checkpoint


def _census(grid: Grid, nodes: list[int]) -> Census:
    """Ask every node for its site id, training-set size and label values (round 0)."""
    config = ConfigRecord({p.WIRE: p.WIRE_VERSION})
    messages = [Message(RecordDict({p.CONFIG: config}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in nodes]
    replies = checked_replies(list(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S)),
                              nodes, "census")
    node_of, sizes, labels = {}, {}, set()
    for reply in replies:
        config = reply.content[p.CONFIG]
        site = str(config[p.SITE_ID])
        if site in node_of:
            raise ClientFailure(
                f"nodes {node_of[site]} and {reply.metadata.src_node_id} both report site "
                f"id {site!r}; give each SuperNode its own --node-config 'site-id=\"...\"'")
        node_of[site] = reply.metadata.src_node_id
        sizes[site] = int(config[p.NUM_TRAIN_EXAMPLES])
        labels |= set(config[p.LABEL_NAMES])
    empty = [site for site, size in sizes.items() if size == 0]
    if empty:
        raise ClientFailure(f"site(s) {empty} have no training records")
    if len(labels) < 2:
        raise ClientFailure(f"the federation's data has labels {sorted(labels)}; "
                            "classification needs at least two")
    return Census(node_of, sizes, sorted_label_names(labels))


def _sample_sites(spec: RunSpec, sites: list[str], rnd: int) -> list[str]:
    """This round's sites, from a generator derived from (seed, round): m of them, or
    under client-level DP with Poisson sampling each with probability m / N."""
    rng = random.Random(_derived_seed(spec.seed, rnd, "sites"))
    m = spec.clients_per_round
    if spec.privacy.client_level and spec.privacy.client_sampling == "poisson":
        return [s for s in sites if rng.random() < m / len(sites)]
    return sorted(rng.sample(sites, m))


def _evaluate(grid: Grid, strategy: LoraFedAvg, arrays: dict, nodes: list[int], rnd: int,
              labels: tuple[str, ...]) -> tuple[float, float]:
    config = ConfigRecord({p.WIRE: p.WIRE_VERSION, p.ROUND: rnd,
                           p.LABEL_NAMES: list(labels)})
    replies = list(grid.send_and_receive(strategy.evaluate_messages(arrays, nodes, config),
                                         timeout=REPLY_TIMEOUT_S))
    loss, accuracy, _ = strategy.aggregate_evaluate(replies, nodes)
    return loss, accuracy


def _round_config(spec: RunSpec, rnd: int, site: str, labels: tuple[str, ...],
                  plan: PrivacyPlan, secure: bool) -> ConfigRecord:
    config = ConfigRecord({p.WIRE: p.WIRE_VERSION, p.ROUND: rnd,
                           p.ROUND_SEED: _derived_seed(spec.seed, rnd, site),
                           p.LABEL_NAMES: list(labels), p.SECURE_NOISE: secure})
    if plan.sample:
        config[p.NOISE_MULTIPLIER] = plan.sample.noise_multiplier[site]
    return config


def _derived_seed(seed: int, rnd: int, purpose: str) -> int:
    digest = hashlib.sha256(f"{seed}:{rnd}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def _secure_noise(spec: RunSpec, grid: Grid) -> bool:
    """privacy.secure-noise, or "auto": seeded only inside a simulation."""
    if spec.privacy.secure_noise is not None:
        return spec.privacy.secure_noise
    return type(grid).__name__ != "InMemoryGrid"  # Flower's simulation grid


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


def _log_plan(spec: RunSpec, plan: PrivacyPlan, census: Census, secure: bool) -> None:
    if not plan.enabled:
        log.warning("privacy.level=\"none\": training WITHOUT differential privacy")
        return
    if plan.sample:
        s = plan.sample
        for site in census.sites:
            log.info("sample level, client %s: n=%d q=%.4f sigma=%.4f (target eps=%g, "
                     "delta=%.3g, %d steps)", site, census.sizes[site],
                     s.sampling_probability[site], s.noise_multiplier[site],
                     s.target_epsilon, s.delta, spec.num_server_rounds * spec.train.local_steps)
    if plan.client:
        c = plan.client
        log.info("client level: %s sampling, m=%d of N=%d, S=%g, z=%.4f, noise std on the "
                 "mean %.3g (target eps=%g, delta=%.3g, %d rounds)", c.sampling,
                 c.expected_clients, c.num_clients, c.clip_norm, c.noise_multiplier,
                 c.noise_std, c.target_epsilon, c.delta, spec.num_server_rounds)
    log.info("noise source: %s", "OS CSPRNG (secure)" if secure
             else "seeded (simulation only: reproducible, not secret)")


def _plan_summary(spec: RunSpec, plan: PrivacyPlan, census: Census, secure: bool) -> dict:
    summary = {"level": spec.privacy.level, "client_sizes": census.sizes,
               "secure_noise": secure}
    if plan.sample:
        summary["sample"] = {
            "unit": "one record of one client (add/remove)",
            "target_epsilon": plan.sample.target_epsilon, "delta": plan.sample.delta,
            "planned_steps_per_client": spec.num_server_rounds * spec.train.local_steps,
            "sampling_probability": plan.sample.sampling_probability,
            "noise_multiplier": plan.sample.noise_multiplier,
            "max_grad_norm": spec.privacy.max_grad_norm}
    if plan.client:
        c = plan.client
        summary["client"] = {
            "unit": "all records of one client", "sampling": c.sampling,
            "relation": "add/remove" if c.sampling == "poisson" else "replace-one",
            "target_epsilon": c.target_epsilon, "delta": c.delta,
            "planned_rounds": spec.num_server_rounds, "num_clients": c.num_clients,
            "expected_clients": c.expected_clients, "clip_norm": c.clip_norm,
            "noise_multiplier": c.noise_multiplier}
    return summary


def _log_round(row: dict, rounds: int) -> None:
    def eps(value):
        return "off" if value is None else f"{value:.3f}"
    log.info("round %d/%d | eval_loss %.4f | eval_acc %.4f | eps_sample %s | "
             "eps_client %s | up %.1f KB | down %.1f KB | agg_err %.2e | %.1f s",
             row["round"], rounds, row["eval_loss"], row["eval_accuracy"],
             eps(row["epsilon_sample"]), eps(row["epsilon_client"]),
             row["bytes_up"] / 1e3, row["bytes_down"] / 1e3, row["aggregation_error"],
             row["wall_s"])


def _mean(values) -> float | None:
    values = list(values)
    return float(sum(values) / len(values)) if values else None


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
