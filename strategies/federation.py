"""The federated run after the census: privacy plan, model, rounds, run folder.

Each round samples sites, stops before any reported epsilon would pass its target,
trains, charges the central accountant with what was really used, aggregates (FedAvg,
or DP-FedAvg at client level), evaluates on every client's test split, appends one
metrics line and checkpoints. `resume=true` continues a run folder from its last
checkpoint.

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
import time
from datetime import datetime

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid

from fed_dplora import protocol as p
from fed_dplora.checkpoint import Checkpoint
from fed_dplora.config import RunSpec
from fed_dplora.dp.noise import random_source
from fed_dplora.lora.adapters import lora_a_fingerprint, load_trainable_arrays, trainable_arrays
from fed_dplora.lora.model import ModelRecipe, build_lora_model
from fed_dplora.privacy.central import CentralAccountant, plan_privacy
from fed_dplora.privacy.plan import PrivacyPlan
from fed_dplora.results import RunFolder
from strategies.census import REPLY_TIMEOUT_S, Census
from strategies.client_level_dp import DpFedAvg
from strategies.lora_fedavg import LoraFedAvg, payload_bytes
from strategies.replies import ClientFailure

log = logging.getLogger("fed_dplora.server")


def run_federation(grid: Grid, context: Context, spec: RunSpec, secure: bool,
                   nodes: list[int], census: Census, started: float) -> None:
    """Plan privacy, build the model, run the rounds and write the run folder."""
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
    log.info("set-up %.1f s: nodes and census %.1f s (clients start and load their "
             "data; the server imports its training half), privacy plan and model %.1f s", time.perf_counter() - started,
             census_s, time.perf_counter() - started - census_s)
    state = Checkpoint(0, arrays, {}, census.as_dict())
    run.write_json("privacy_plan.json", _plan_summary(spec, plan, census, secure))
    if checkpoint:
        state = _restore(checkpoint, accountant, secure)
        arrays = state.arrays

    for rnd in range(state.round + 1, spec.num_server_rounds + 1):
        if state.stopped:
            break
        start, started_at = time.perf_counter(), time.time()
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
            "started_at": started_at, "wall_s": time.perf_counter() - start,
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
