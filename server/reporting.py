"""What a run reports: the privacy plan's log and summary, the per-round log line, and
the final report and summary, with what secret sampling keeps out of shared files."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

from fed_dplora.run.checkpoint import Checkpoint
from fed_dplora.config import RunSpec
from fed_dplora.privacy.central import CentralAccountant
from fed_dplora.privacy.plan import PrivacyPlan
from fed_dplora.run.results import RunFolder
from server.census import Census
from strategies import wire as p

log = logging.getLogger("fed_dplora.server")


def log_plan(spec: RunSpec, plan: PrivacyPlan, census: Census, secure: bool) -> None:
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


def plan_summary(spec: RunSpec, plan: PrivacyPlan, census: Census, secure: bool) -> dict:
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


def log_round(row: dict, rounds: int) -> None:
    """The round's line; a lost round, and each failed site, are named after it."""
    def num(value, fmt: str) -> str:
        return "off" if value is None else format(value, fmt)
    extra = (f" | eval_ppl {num(row['eval_perplexity'], '.2f')}"
             if "eval_perplexity" in row else
             f" | macro_f1 {num(row['eval_macro_f1'], '.4f')}")
    if "personal_eval_accuracy" in row:
        extra += f" | personal_acc {num(row['personal_eval_accuracy'], '.4f')}"
    rule = ("" if "pooled_eval_accuracy" not in row else  # a robust evaluation.rule
            f" by {row['eval_rule']} (pooled: loss {num(row['pooled_eval_loss'], '.4f')}, "
            f"acc {num(row['pooled_eval_accuracy'], '.4f')})")
    sample = num(row["epsilon_sample"], ".3f")
    if row["epsilon_sample_replace_one"] is not None:
        sample += f" (replace-one {row['epsilon_sample_replace_one']:.3f})"
    log.info("round %d/%d | eval_loss %s%s | eval_acc %s%s | eps_sample %s | eps_client %s | "
             "up %.1f KB | down %.1f KB | agg_err %s | %.1f s", row["round"], rounds,
             num(row["eval_loss"], ".4f"), extra, num(row["eval_accuracy"], ".4f"), rule,
             sample, num(row["epsilon_client"], ".3f"),
             row["bytes_up"] / 1e3, row["bytes_down"] / 1e3,
             num(row["aggregation_error"], ".2e"), row["wall_s"])
    if row["lost"]:
        log.warning("round %d lost: %d valid replies from %d sites asked; no new aggregate",
                    row["round"], row["replies"], len(row["clients"]))
    for phase, failed in row["failures"].items():
        for site, reason in failed.items():
            log.warning("round %d: site %s %s: %s", row["round"], site,
                        "declined" if phase == "declined" else f"failed to {phase}", reason)


def log_participation(row: dict) -> None:
    """Secret sampling: who took part stays in the coordinator's own log, never in the
    files it may share."""
    log.info("round %d participation (private): %s", row["round"], json.dumps(
        {k: row[k] for k in PARTICIPATION_FIELDS if k in row}, default=str))


def publishable_state(state: Checkpoint, accountant: CentralAccountant, planned: Census,
                      secure: bool) -> Checkpoint:
    """The final checkpoint as the run folder keeps it. With secret sampling it tells
    nobody who trained: each site's sample ledger as if drawn in every charged round
    (the report's bound), and no per-site declines, exclusions or failure streaks."""
    if not secure:
        return state
    rounds = state.round + len(state.lost_rounds)
    return dataclasses.replace(state, ledgers=accountant.state_if_secret(planned.sites, rounds),
                               pending=None, declined={}, excluded=[], failure_streaks={})


def write_final(run: RunFolder, plan: PrivacyPlan, accountant: CentralAccountant,
                planned: Census, state: Checkpoint, secure: bool, started: float) -> None:
    """privacy_report.json, then summary.json: written last, it marks a finished run.
    With secret sampling neither tells how often, or whether, a site was asked."""
    report = final_report(plan, accountant, planned, state, secure)
    if plan.enabled:
        run.write_json("privacy_report.json", report)
        log.info("privacy report: %s", run.path / "privacy_report.json")
    if secure and state.declined:
        log.info("declined sites (private): %s", state.declined)
    run.write_json("summary.json", {
        "finished": True, "rounds_completed": state.round, "stopped": state.stopped,
        "rounds_lost_to_failures": len(state.failed_rounds),  # which: checkpoint, log
        "epsilon_sample": report.get("sample", {}).get("epsilon_rdp_max"),
        "epsilon_client": accountant.epsilon_client(),
        "wall_s": time.perf_counter() - started})


def final_report(plan: PrivacyPlan, accountant: CentralAccountant, planned: Census,
                 state: Checkpoint, secure: bool) -> dict:
    """`privacy_report.json`'s content ({} without DP)."""
    if not plan.enabled:
        return {}
    charged_rounds = state.round + len(state.lost_rounds)
    return {**accountant.report(planned.sites, charged_rounds if secure else None),
            "secure_noise": secure,
            **randomness_report(planned.randomness, secure, plan.sample is not None),
            "rounds_completed": state.round, "lost_rounds": state.lost_rounds,
            "rounds_lost_to_failures": len(state.failed_rounds),
            "declined_sites": "in the coordinator's log (secret sampling)" if secure
                              else state.declined,
            "stopped": state.stopped}


# Per-round fields that tell who took part (ids, counts, bytes, failures, the max of the
# per-site epsilons, aggregates of the participants' replies, how long they took, and
# when the round ran).
PARTICIPATION_FIELDS = ("clients", "replies", "bytes_up", "bytes_down", "failures", "lost",
                        "epsilon_sample", "epsilon_sample_replace_one", "train_loss",
                        "clip_fraction", "update_clip_fraction", "aggregation_error",
                        "train_s", "evaluate_s", "started_at", "wall_s")


def shareable(row: dict, secret_sampling: bool) -> dict:
    """The metrics line written to be shared. With secret sampling (secure noise) it
    carries no participation signal: client-level amplification by sampling assumes
    nobody learns who took part. The coordinator's log keeps those fields
    (`log_participation`)."""
    if not secret_sampling:
        return row
    return {k: v for k, v in row.items() if k not in PARTICIPATION_FIELDS}


def randomness_report(randomness: dict[str, str], secure: bool, sample_noise: bool) -> dict:
    """Each site's own randomness, whose epsilon is void, and what sampling assumes."""
    seeded = sorted(s for s, mode in randomness.items() if mode == p.SEEDED_BY_SITE)
    void = seeded if sample_noise else sorted(randomness)
    report = {"randomness": randomness, "epsilon_void_sites": void}
    if seeded:
        report["epsilon_void_note"] = (
            "these sites opted out of fresh randomness outside Flower's simulation "
            "(node config secure-noise=false): their noise and sampling can be recomputed "
            "from the run seed, so no epsilon protects their records")
    if not sample_noise:
        report["epsilon_void_note"] = (
            "no sample-level noise: every site's tensors left it without DP-SGD (a deployed "
            "site trains such rounds only with allow-unnoised=true in its node config), "
            "so no sample-level epsilon protects any site's records")
    if not secure:
        report["sampling_note"] = (
            "seeded simulation: amplification by client sampling (client level) assumes "
            "the participants are secret; here they follow from the run seed")
    return report
