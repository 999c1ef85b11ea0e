"""The federated run after the census: privacy plan, model, rounds, run folder.

The rounds go through the same Flower strategy a user can take into their own
ServerApp (`FfaFedAvg` / `LoraFedAvg`, wrapped by `ClientLevelDpFedAvg` at client
level): `configure_train`, `aggregate_train`, `configure_evaluate`,
`aggregate_evaluate`. Around them this module keeps what Flower's `start()` has no hook
for: the census-based privacy plan, the ledger and the budget stop, each site's round
config, the write-ahead checkpoint and the failure policy:

- a site that fails a round (error, timeout, invalid reply) is still charged in full
  for what it was asked to do (it may have released noised tensors before failing);
- a round with fewer than `min-replies` valid replies is lost: charged, logged, no new
  aggregate; `max-lost-rounds` lost in a row stop the run, as does having no site left.

Randomness: site sampling, round seeds and the server's DP-FedAvg noise derive from
(seed, round) in a seeded simulation, so a resumed run replays exactly; with secure
noise (the default outside simulation) they come from the OS CSPRNG.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fed_dplora.run.checkpoint import Checkpoint
from fed_dplora.config import RunSpec
from fed_dplora.dp.noise import random_source
from fed_dplora.dp.update_bound import site_update_bounds
from fed_dplora.lora.adapters import global_arrays, load_trainable_arrays
from fed_dplora.lora.model import ModelRecipe, build_lora_model
from fed_dplora.methods import method_for
from fed_dplora.ops.memory import release_freed_memory
from fed_dplora.privacy.central import CentralAccountant, plan_privacy
from fed_dplora.privacy.plan import PrivacyPlan
from fed_dplora.run.results import RunFolder, read_base_score
from fed_dplora.seeds import derived_seed
from fed_dplora.tasks import task_for
from server import reporting, resume
from server.census import Census
from server.lm_outputs import LmOutputs
from server.sites import EvaluationSampler, SiteConfigs, SiteSampler
from strategies import wire as p
from strategies.client_level_dp import ClientLevelDpFedAvg
from strategies.evaluation_pooling import MACRO_F1, POOLED, RECALL
from strategies.lora_fedavg import FfaFedAvg, LoraFedAvg
from strategies.screening import Screened, ScreenedMetrics
from strategies.wire import payload_bytes, to_arrays, to_record

log = logging.getLogger("fed_dplora.server")


def run_federation(grid: Grid, context, spec: RunSpec, secure: bool, census: Census,
                   started: float) -> None:
    """Plan privacy, build the model, run the rounds and write the run folder."""
    federation = Federation.set_up(grid, context.run_id, spec, secure, census, started)
    if read_base_score(federation.run.path) is None:
        federation.evaluate_base()
    for rnd in range(federation.state.round + 1, spec.num_server_rounds + 1):
        if not federation.run_round(rnd):
            break
        release_freed_memory()  # this process also holds Flower's message store
    federation.finish(started)


@dataclass
class Federation:
    grid: Grid
    spec: RunSpec
    secure: bool
    run: RunFolder
    planned: Census  # the sites the privacy plan was built for
    site_of: dict[int, str]  # node ids of the planned sites connected now -> site
    plan: PrivacyPlan
    accountant: CentralAccountant
    lora: LoraFedAvg
    strategy: Strategy  # `lora`, or `lora` wrapped by client-level DP
    model: torch.nn.Module
    arrays: dict[str, np.ndarray]  # the global tensors that travel
    state: Checkpoint
    lm: LmOutputs | None  # causal-lm: perplexity and greedy samples each round
    run_key: str = ""  # names each site's own state of the run (resume.run_key)
    waits: dict[str, float] = field(default_factory=dict)  # this round's, by phase
    # seconds from the ServerApp's start: nodes and census, and the whole set-up
    setup_times: dict[str, float] = field(default_factory=dict)

    @classmethod
    def set_up(cls, grid: Grid, run_id: int, spec: RunSpec, secure: bool, census: Census,
               started: float) -> "Federation":
        census_s = time.perf_counter() - started
        run, checkpoint = resume.open_run(spec, run_id, census)
        planned = resume.planned_census(spec, census, checkpoint)
        plan = plan_privacy(spec, planned.sizes)
        reporting.log_plan(spec, plan, planned, secure)
        model = build_lora_model(ModelRecipe.from_spec(spec, len(planned.labels)),
                                 torch.device("cpu"))
        site_of = {node: site for site, node in planned.node_of.items()}
        lora, strategy = _strategies(spec, plan, planned, site_of, secure, model)
        accountant = CentralAccountant(plan, spec.train.local_steps)
        run.write_json("privacy_plan.json",
                       reporting.plan_summary(spec, plan, planned, secure))
        state = Checkpoint(0, global_arrays(model, method_for(spec.method)), {},
                           planned.as_dict())
        if checkpoint:
            state = resume.restore(checkpoint, accountant, secure)
            lora.health.restore(state.excluded, state.failure_streaks, planned.node_of)
        lm = LmOutputs.for_run(spec, run, model)
        if lm and not checkpoint:
            lm.write_samples(0, state.arrays)
        federation = cls(grid, spec, secure, run, planned, site_of, plan, accountant,
                         lora, strategy, model, state.arrays, state, lm, resume.run_key(run))
        federation.setup_times = {"census_s": census_s,
                                  "setup_s": time.perf_counter() - started}
        log.info("set-up %.1f s: nodes and census %.1f s (clients start and load their "
                 "data; the server imports its training half), privacy plan and model "
                 "%.1f s", federation.setup_times["setup_s"], census_s,
                 federation.setup_times["setup_s"] - census_s)
        return federation

    def evaluate_base(self) -> None:
        """Round 0: the model before any training (every B is 0, so LoRA adds nothing),
        evaluated where the sites share evaluation: what training then buys shows."""
        start, started_at, self.waits = time.perf_counter(), time.time(), {}
        evaluation, sent = self._evaluate(0, to_record(self.arrays))
        untrained = ScreenedMetrics({"replies": 0, "failures": 0, "lost": 0},
                                    Screened([], {}, {}))
        row = self._row(0, [], untrained, evaluation, sent, started_at, start)
        self._commit(0, {**row, **self.setup_times})  # round 0's row: what set-up cost

    def run_round(self, rnd: int) -> bool:
        """One round; False when the run stops before it (budget, failures)."""
        start, started_at, self.waits = time.perf_counter(), time.time(), {}
        self.state.stopped = self._failure_stop()
        if self.state.stopped:
            return False
        train_messages = list(self.strategy.configure_train(
            rnd, to_record(self.arrays), self._shared_config(), self.grid))
        sampled = self._sites_of(train_messages)
        refusal = self.accountant.refusal(sampled)
        if refusal:
            log.warning("stopping before round %d: %s", rnd, refusal)
            self.state.stopped = f"budget: stopped before round {rnd}: {refusal}"
            return False
        self._write_ahead(rnd, sampled)
        new_arrays, train = self.strategy.aggregate_train(
            rnd, self._exchange(train_messages, "train"))
        self._charge(train.screened)
        evaluation, eval_messages = None, 0
        if new_arrays is None:
            self.state.failed_rounds.append(rnd)
        else:
            self.arrays = to_arrays(new_arrays)
            self._mark_released()
            if self.lora.evaluation_sampler.evaluates(rnd):
                evaluation, eval_messages = self._evaluate(rnd, new_arrays)
            if self.lm:
                self.lm.write_samples(rnd, self.arrays)
        row = self._row(rnd, sampled, train, evaluation, eval_messages, started_at, start)
        self._commit(rnd, row)
        return True

    def finish(self, started: float) -> None:
        self.state.ledgers = self.accountant.state()
        reporting.publishable_state(self.state, self.accountant, self.planned,
                                    self.secure).save(self.run.path)
        load_trainable_arrays(self.model, self.arrays, set(self.arrays))
        adapter = method_for(self.spec.method).exportable(self.model)
        log.info("final adapter: %s", self.run.save_adapter(adapter))
        reporting.write_final(self.run, self.plan, self.accountant, self.planned,
                               self.state, self.secure, started)

    def _failure_stop(self) -> str | None:
        """Why the run cannot go on: too many lost rounds in a row, or no site left."""
        streak, rnd = 0, self.state.round
        while rnd in self.state.failed_rounds:
            streak, rnd = streak + 1, rnd - 1
        limit = self.spec.failure.max_lost_rounds
        if streak >= limit:
            reason = (f"failures: {streak} rounds in a row had fewer than min-replies valid "
                      f"replies (max-lost-rounds={limit}); see the log for each site's error")
        elif not self.lora.askable_nodes(self.grid):
            reason = ("failures: no site is left to ask (all gone, excluded for failing, or "
                      "out of their own privacy budget)")
        else:
            return None
        log.error("stopping: %s", reason)
        return reason

    def _shared_config(self) -> ConfigRecord:
        return ConfigRecord({p.WIRE: p.WIRE_VERSION, p.LABEL_NAMES: list(self.planned.labels),
                             p.SECURE_NOISE: self.secure, p.RUN_KEY: self.run_key})

    def _sites_of(self, messages: list[Message]) -> list[str]:
        return sorted(self.site_of[m.metadata.dst_node_id] for m in messages)

    def _write_ahead(self, rnd: int, sampled: list[str]) -> None:
        """A crash from here on leaves a record of the round in flight: what each site
        was asked to do, which of them draw fresh randomness, and (`_mark_released`)
        whether the aggregate left the server."""
        fresh = [s for s in sampled if self.planned.randomness.get(s) == p.FRESH]
        self.state.pending = {"round": rnd, "fresh_sites": fresh, "released": False,
                              "sample_charges": self.accountant.planned_sample_charges(sampled)}
        self.state.ledgers = self.accountant.state()
        self.state.save(self.run.path)

    def _mark_released(self) -> None:
        """Before the new aggregate is broadcast for evaluation."""
        self.state.pending["released"] = True
        self.state.save(self.run.path)

    def _charge(self, screened: Screened) -> None:
        """Valid replies: what they report using (checked against the plan). Failed
        sites: everything they were asked to do, since they may have released it."""
        planned = self.accountant.planned_sample_charges(
            [self.site_of[n] for n in screened.failed])
        used = {site: (q, sigma, int(steps)) for site, (q, sigma, steps) in planned.items()}
        for node, reply in screened.accepted.items():
            m = reply.metrics
            used[self.site_of[node]] = (m[p.SAMPLING_PROBABILITY], m[p.NOISE_MULTIPLIER],
                                        int(m[p.STEPS]))
        self.accountant.charge_sample(used)
        self.accountant.charge_client_round()

    def _evaluate(self, rnd: int, arrays: ArrayRecord) -> tuple[ScreenedMetrics, int]:
        """(metrics over the valid replies, evaluation messages sent)."""
        messages = list(self.strategy.configure_evaluate(
            rnd, arrays, self._shared_config(), self.grid))
        replies = self._exchange(messages, "evaluate")
        return self.strategy.aggregate_evaluate(rnd, replies), len(messages)

    def _exchange(self, messages: list[Message], phase: str) -> list[Message]:
        """Send and wait for the replies; the wait is timed (the clients' side of the
        round, transport included) into `waits`."""
        start = time.perf_counter()
        replies = list(self.grid.send_and_receive(
            messages, timeout=self.spec.failure.round_timeout))
        self.waits[phase] = time.perf_counter() - start
        return replies

    def _failures(self, train: Screened, evaluation: Screened | None
                  ) -> dict[str, dict[str, str]]:
        """{phase: {site: reason}} of this round; "declined": out of the site's budget."""
        phases = {"train": train.failed, "declined": train.declined}
        if evaluation is not None:
            phases["evaluate"] = evaluation.failed
        return {phase: {self.site_of[n]: reason for n, reason in failed.items()}
                for phase, failed in phases.items()}

    def _row(self, rnd: int, sampled: list[str], train: ScreenedMetrics,
             evaluation: ScreenedMetrics | None, eval_sent: int, started_at: float,
             start: float) -> dict:
        accepted = train.screened.accepted.values()
        failures = self._failures(train.screened,
                                  evaluation.screened if eval_sent else None)
        evaluation = evaluation or {}
        return {
            "round": rnd, **self._evaluation_fields(evaluation),
            "train_loss": train.get(p.TRAIN_LOSS), "clip_fraction": train.get(p.CLIP_FRACTION),
            "update_clip_fraction": train.get("update-clip-fraction"),
            "epsilon_sample": self.accountant.epsilon_sample(),
            "epsilon_sample_replace_one": self.accountant.epsilon_sample_replace_one(),
            "epsilon_client": self.accountant.epsilon_client(),
            "delta": self.plan.sample.delta if self.plan.sample else None,
            "delta_client": self.plan.client.delta if self.plan.client else None,
            "bytes_up": sum(payload_bytes(a.arrays) for a in accepted),
            "bytes_down": payload_bytes(self.arrays) * (len(sampled) + eval_sent),
            "clients": sampled, "replies": len(accepted), "lost": bool(train["lost"]),
            "failures": failures,
            "aggregation_error": train.get("aggregation-error"),
            "train_s": self.waits.get("train"), "evaluate_s": self.waits.get("evaluate"),
            "started_at": started_at, "wall_s": time.perf_counter() - start,
        }

    def _evaluation_fields(self, evaluation: MetricRecord | dict) -> dict:
        """The figure by `evaluation.rule` (named in `eval_rule`) and, under a rule other
        than "pooled", the pooled figure beside it (`pooled_` + each field)."""
        fields = {**self._figure_fields(evaluation), "eval_rule": self.spec.evaluation.rule}
        if self.spec.evaluation.rule == "pooled":
            return fields
        pooled = {**evaluation, **{k.removeprefix(POOLED): v for k, v in evaluation.items()
                                   if k.startswith(POOLED)}}
        return {**fields, **{f"pooled_{k}": v for k, v in self._figure_fields(pooled).items()
                             if k not in ("eval_sites", "eval_records")}}

    def _figure_fields(self, evaluation: MetricRecord | dict) -> dict:
        """Test metrics (classification: macro-F1, recall per label), validation metrics
        where the sites hold a validation split, perplexity for causal-lm; the same
        under each site's own tensors where the method keeps some (FedSA)."""
        fields = {"eval_loss": evaluation.get(p.EVAL_LOSS),
                  "eval_accuracy": evaluation.get(p.EVAL_ACCURACY),
                  # what the metrics cover (evaluation.sites may sample)
                  "eval_sites": evaluation.get("replies"),
                  "eval_records": evaluation.get(p.NUM_EXAMPLES)}
        for prefix, name in ((p.PERSONAL, "personal_eval"),
                             (p.PERSONAL + p.VALIDATION, "personal_val")):
            if prefix + p.EVAL_ACCURACY in evaluation:  # under each site's own tensors
                fields.update({f"{name}_{field}": evaluation.get(prefix + key) for field, key
                               in (("loss", p.EVAL_LOSS), ("accuracy", p.EVAL_ACCURACY),
                                   ("macro_f1", MACRO_F1))})
        if self.lm:
            return {**fields, **self.lm.row_fields(evaluation.get(p.EVAL_LOSS))}
        recall = evaluation.get(RECALL)
        fields.update({
            "eval_macro_f1": evaluation.get(MACRO_F1),
            "eval_recall": None if recall is None else {
                label: None if r < 0 else r for label, r in zip(self.planned.labels, recall)},
            "val_loss": evaluation.get(p.VALIDATION + p.EVAL_LOSS),
            "val_accuracy": evaluation.get(p.VALIDATION + p.EVAL_ACCURACY),
            "val_macro_f1": evaluation.get(p.VALIDATION + MACRO_F1)})
        return fields

    def _commit(self, rnd: int, row: dict) -> None:
        self.run.append_metrics(reporting.shareable(row, self.secure))
        if self.secure:
            reporting.log_participation(row)
        health = self.lora.health
        self.state = Checkpoint(rnd, self.arrays, self.accountant.state(),
                                self.planned.as_dict(), lost_rounds=self.state.lost_rounds,
                                failed_rounds=self.state.failed_rounds,
                                declined={**self.state.declined, **row["failures"]["declined"]},
                                excluded=sorted(self.site_of[n] for n in health.excluded),
                                failure_streaks={self.site_of[n]: k
                                                 for n, k in health.streak.items()})
        self.state.save(self.run.path)
        reporting.log_round(row, self.spec.num_server_rounds)


def _strategies(spec: RunSpec, plan: PrivacyPlan, planned: Census, site_of: dict[int, str],
                secure: bool, model: torch.nn.Module) -> tuple[LoraFedAvg, Strategy]:
    """The Flower strategy the rounds go through, with this project's hooks."""
    method = method_for(spec.method)
    kind = FfaFedAvg if method.shared_a else LoraFedAvg
    node_of = planned.node_of  # the planned sites connected now (site_of's inverse)
    evaluators = {node_of[s] for s, mode in planned.share_metrics.items()
                  if s in node_of and mode != p.SHARE_DP_ONLY}
    # The dimension of every global tensor: where a round trains a part (RoLoRA), the
    # bound is looser than it could be, never tighter (it grows with the dimension).
    bounds = site_update_bounds(spec, plan, planned.sizes,
                                sum(a.size for a in global_arrays(model, method).values()))
    lora = kind.for_model(
        model, min_replies=spec.failure.min_replies, nodes=set(node_of.values()),
        evaluators=evaluators,
        max_site_failures=spec.failure.max_site_failures, min_available_nodes=0,
        node_sampler=SiteSampler(spec, planned.sites, node_of, secure),
        node_config=SiteConfigs(spec, plan, site_of),
        evaluation_sampler=EvaluationSampler(spec, secure),
        sizes={node_of[s]: planned.sizes[s] for s in node_of},
        eval_sizes={node_of[s]: n for s, n in planned.eval_sizes.items() if s in node_of},
        update_bounds={node_of[s]: b for s, b in bounds.items() if s in node_of} or None,
        max_eval_weight_per_record=task_for(spec.task).eval_weight_per_record(
            spec.model.max_length),
        aggregation=spec.aggregation, evaluation=spec.evaluation, method=method)
    if not plan.client:
        return lora, lora
    return lora, ClientLevelDpFedAvg(
        lora, plan.client.noise_multiplier, plan.client.clip_norm,
        plan.client.expected_clients,
        lambda rnd: random_source(secure, derived_seed(spec.seed, rnd, "server-noise")))
