"""The site's rule, tried as a hostile coordinator would: crafted messages and run
configs against the real ClientApp of one deployed site, in process. Every bit the site
sends is the DP mechanism's output, a metric it agreed to share, or a function of public
inputs: no reply kind, error type or text, or decline reason tells one record from
another, and the coordinator cannot choose which records train or evaluate.

Each test names the mutant (the fix removed) it kills.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import (FEDERATION_LABELS, HostileCoordinator, head_bias, site,  # noqa: F401
                     spent_runs, train_with_labels, what_it_tells)

import fed_dplora.site.trainer as trainer_module
from clients import runtime
from fed_dplora.config import parse_run_config
from fed_dplora.data.site import load_site
from fed_dplora.dp import guards
from fed_dplora.dp.engine import DpSgdAccumulator
from fed_dplora.refusals import MAX_ARRAY_ABS, WITHHELD
from strategies import wire as p
from strategies.wire import to_arrays


def test_a_guard_cannot_be_aimed_at_a_label(monkeypatch, config, site):
    """Issue 47's label oracle: one record trains (here the site's own, careless, choice
    of split), sigma is huge and the head is biased to class c, so the record's clipped
    gradient is exactly zero for its true label only. Every c gets the same kind of
    reply. Mutant killed: the ClientApp trains a deployed site with `withhold=False`
    (the signal guard raises on private data, GuardError for the true label only)."""
    site.update({"max-records": 12, "validation-fraction": 0.9, "min-train-records": 1,
                 "min-eval-records": 1})
    coordinator = HostileCoordinator(monkeypatch, site, {**config, "local-steps": 1,
                                                        "batch-size": 1,
                                                        "physical-batch-size": 1})
    census = coordinator.census()
    assert census.content[p.CONFIG][p.NUM_TRAIN_EXAMPLES] == 1
    arrays = coordinator.global_arrays()
    told = set()
    for label in range(len(FEDERATION_LABELS)):
        crafted = copy.deepcopy(arrays)
        crafted[head_bias(crafted)][label] = MAX_ARRAY_ABS
        told.add(json.dumps(what_it_tells(coordinator.train(crafted, sigma=1000.0)),
                            default=str))
    assert len(told) == 1, told
    assert json.loads(told.pop())[0] == "reply"



def test_label_names_cannot_ask_which_labels_a_sites_records_hold(monkeypatch, config,
                                                                   site):
    """A message that leaves out one declared label once failed to tokenize exactly when
    the site held a record of it (a DataError), and trained otherwise. Now each such
    message is declined with the same text, whichever label it leaves out (the site
    declares one label, "unseen", that none of its records has). Mutant killed: the
    message's label names unchecked against the declared set."""
    declared = sorted((*FEDERATION_LABELS, "unseen"))
    site["labels"] = ",".join(declared)
    coordinator = HostileCoordinator(monkeypatch, site, config)
    told = set()
    for left_out in declared:
        reply = train_with_labels(coordinator, [x for x in declared if x != left_out])
        told.add(json.dumps(what_it_tells(reply)).replace(repr(left_out), "LABEL"))
    assert len(told) == 1, told
    assert "leave out [LABEL]" in told.pop()
    assert spent_runs(Path(site["privacy-ledger"])) == 0


def test_a_site_holding_an_undeclared_label_declines_whatever_the_message_names(
        monkeypatch, config, site):
    """Its records' labels outside its declared set would fail to tokenize only when the
    message leaves them out: it declines every message alike instead. Mutant killed: the
    records' labels unchecked against the declared set."""
    site["labels"] = ",".join(FEDERATION_LABELS[1:])
    coordinator = HostileCoordinator(monkeypatch, site, config)
    replies = {json.dumps(what_it_tells(train_with_labels(coordinator, names)))
               for names in (FEDERATION_LABELS, FEDERATION_LABELS[1:])}
    assert len(replies) == 1 and "does not declare" in replies.pop()
    assert spent_runs(Path(site["privacy-ledger"])) == 0


def test_the_run_config_cannot_choose_a_deployed_sites_split(monkeypatch, config, site):
    """The attack's other half: `seed`, `data.max-records` and
    `data.validation-fraction` chosen to isolate a record change nothing a deployed site
    trains or evaluates on. Mutant killed: the deployed split follows the run config's
    seed and record cap (`_split_seed` returning `spec.seed`, `max_records` the run's)."""
    placement = runtime_placement(monkeypatch, site)
    honest = load_site(parse_run_config(config), placement)
    chosen = load_site(parse_run_config({**config, "seed": 4, "data.max-records": 10,
                                         "data.validation-fraction": 0.9}), placement)
    assert chosen == honest
    assert len(honest.train) == 240 and honest.validation is None
    coordinator = HostileCoordinator(monkeypatch, site, {**config, "seed": 4,
                                                        "data.max-records": 10})
    assert coordinator.census().content[p.CONFIG][p.NUM_TRAIN_EXAMPLES] == 240


def runtime_placement(monkeypatch, node_config: dict):
    monkeypatch.setattr(runtime, "in_simulation", lambda: False)
    return runtime.placement(node_config)


def test_a_deployed_site_owns_its_split_and_seed(monkeypatch, config, site):
    """The node config's own split: its seed and cap choose the records; without a
    seed, one fixed split per data source (its hash). Mutant killed: the node config's
    `split-seed` ignored."""
    spec = parse_run_config(config)
    default = load_site(spec, runtime_placement(monkeypatch, site))
    again = load_site(spec, runtime_placement(monkeypatch, dict(site)))
    seeded = load_site(spec, runtime_placement(monkeypatch, {**site, "split-seed": 3}))
    capped = load_site(spec, runtime_placement(monkeypatch, {**site, "max-records": 100,
                                                             "validation-fraction": 0.25}))
    assert again == default and seeded.train != default.train
    assert (len(capped.train), len(capped.validation), len(capped.test)) == (60, 20, 20)


def test_a_split_below_the_sites_minimum_is_refused_with_a_public_reason(
        monkeypatch, config, site):
    """The evaluation oracle: a site's test split is never a handful of records. Below
    its minimum it refuses the census and every evaluation, naming the key (a function
    of its node config and published n). Mutant killed: `OwnSplit.check_sizes` not
    called."""
    coordinator = HostileCoordinator(monkeypatch, {**site, "max-records": 80,
                                                   "share-metrics": "evaluation"}, config)
    for reply in (coordinator.census(), coordinator.evaluate(coordinator.global_arrays())):
        assert reply.has_error()
        assert "SplitTooSmall" in reply.error.reason
        assert "min-eval-records=20" in reply.error.reason


def test_evaluation_metrics_cover_the_sites_own_test_split(monkeypatch, config, site):
    """A run config asking for 5 records gets the per-class counts of the site's whole
    test split (60 records), not of one record. Mutant killed: the deployed split
    follows the run config's record cap."""
    coordinator = HostileCoordinator(monkeypatch, {**site, "share-metrics": "evaluation"},
                                     {**config, "data.max-records": 5, "seed": 9})
    metrics = coordinator.evaluate(coordinator.global_arrays()).content[p.METRICS]
    assert metrics[p.NUM_EXAMPLES] == 60 and sum(metrics[p.EVAL_CLASS_TRUE]) == 60


def test_a_deployed_site_that_declares_no_labels_refuses_the_census(monkeypatch, config,
                                                                    site):
    """Mutant killed: the census shares found label values at a deployed site."""
    del site["labels"]
    reply = HostileCoordinator(monkeypatch, site, config).census()
    assert reply.has_error() and "declares no labels" in reply.error.reason


@pytest.mark.parametrize("sigma", [float("nan"), float("inf"), -1.0])
def test_a_non_finite_or_negative_sigma_is_declined_before_any_charge(
        monkeypatch, config, site, sigma):
    """Mutant killed: the round plan takes the message's sigma unchecked (NaN reached
    the ledger, where only dp-accounting's crash stopped it)."""
    coordinator = HostileCoordinator(monkeypatch, site, config)
    reply = coordinator.train(coordinator.global_arrays(), sigma=sigma)
    assert "noise-multiplier" in reply.content[p.CONFIG][p.DECLINED]
    assert spent_runs(Path(site["privacy-ledger"])) == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 10 * MAX_ARRAY_ABS])
def test_a_message_with_non_finite_or_huge_tensors_is_declined_before_any_charge(
        monkeypatch, config, site, value):
    """Mutant killed: `check_message_arrays` not called on train messages."""
    coordinator = HostileCoordinator(monkeypatch, site, config)
    arrays = coordinator.global_arrays()
    arrays[head_bias(arrays)][0] = value
    reply = coordinator.train(arrays)
    assert "PublicRefusal" in reply.content[p.CONFIG][p.DECLINED]
    assert spent_runs(Path(site["privacy-ledger"])) == 0
    evaluated = HostileCoordinator(monkeypatch, {**site, "share-metrics": "evaluation"},
                                   config).evaluate(arrays)
    assert evaluated.has_error() and "PublicRefusal" in evaluated.error.reason


def test_a_record_with_a_nan_gradient_leaves_the_release_finite(monkeypatch, config, site):
    """Through the real ClientApp: after the public probe, the first record of every
    private batch gets a NaN loss, so its per-sample gradient is NaN (clamp(nan) is NaN);
    the deployed site zeroes it and releases finite tensors. Mutant killed: non-finite
    per-sample gradients kept."""
    from fed_dplora.tasks.classification import SequenceClassification
    honest_loss, honest_probe = SequenceClassification.loss_sum, trainer_module.LocalTrainer.probe
    probed = []

    def probe(self, *args, **kwargs):
        honest_probe(self, *args, **kwargs)
        probed.append(True)

    def poisoned(self, logits, input_ids, mask, labels):
        first = torch.zeros_like(logits)
        first[0] = float("nan") if probed else 0.0
        return honest_loss(self, logits + first, input_ids, mask, labels)
    monkeypatch.setattr(trainer_module.LocalTrainer, "probe", probe)
    monkeypatch.setattr(SequenceClassification, "loss_sum", poisoned)
    coordinator = HostileCoordinator(monkeypatch, site, config)
    reply = coordinator.train(coordinator.global_arrays())
    assert not reply.has_error() and p.DECLINED not in reply.content[p.CONFIG]
    released = to_arrays(reply.content[p.ARRAYS])
    assert released and all(np.isfinite(a).all() for a in released.values())


@pytest.mark.parametrize("key,value", [("privacy.max-grad-norm", float("nan")),
                                       ("privacy.max-grad-norm", float("inf")),
                                       ("privacy.max-grad-norm", 1e30),
                                       ("learning-rate", float("nan")),
                                       ("privacy.target-epsilon", float("inf"))])
def test_non_finite_run_config_values_are_refused_with_the_key(monkeypatch, config, site,
                                                               key, value):
    """Mutant killed: positive floats checked with `value <= 0` only (NaN and inf pass)
    and no upper bound on the clip norm."""
    coordinator = HostileCoordinator(monkeypatch, site, {**config, key: value})
    reply = coordinator.train({})
    assert key in reply.content[p.CONFIG][p.DECLINED]
    assert spent_runs(Path(site["privacy-ledger"])) == 0


def test_a_failed_wiring_check_on_the_probe_declines_before_any_charge(
        monkeypatch, config, site):
    """The stale-optimizer failure, caught on the probe batch: declined with its public
    reason, nothing charged, no private step taken. Mutant killed: the probe run after
    the ledger's charge (or not at all, when the private guard would raise its type)."""
    real = trainer_module.make_optimizer
    monkeypatch.setattr(trainer_module, "make_optimizer",
                        lambda model, name, lr: real(copy.deepcopy(model), name, lr))
    coordinator = HostileCoordinator(monkeypatch, site, config)
    reply = coordinator.train(coordinator.global_arrays())
    assert "ProbeFailed" in reply.content[p.CONFIG][p.DECLINED]
    assert "stale copies" in reply.content[p.CONFIG][p.DECLINED]
    assert spent_runs(Path(site["privacy-ledger"])) == 0


@pytest.mark.parametrize("owner,guard", [(guards, "check_optimizer_holds_model_params"),
                                         (DpSgdAccumulator, "add_physical_batch")])
def test_a_guard_on_private_data_withholds_with_one_text_and_is_charged(
        monkeypatch, config, site, owner, guard):
    """A fail-closed check that fires on private data only (the probe passed): one
    text whatever fired, nothing of its own message, and the site's ledger charged.
    Mutant killed: `train` re-raising the guard's own error at a deployed site."""
    real, calls = getattr(owner, guard), []

    def fires_second_time(*args):
        calls.append(1)
        if len(calls) == 2:  # the first call is the probe's
            raise guards.CoverageError(f"{guard} fired on record 17 (label urgent)")
        return real(*args)
    monkeypatch.setattr(owner, guard, fires_second_time)
    coordinator = HostileCoordinator(monkeypatch, site, config)
    reply = coordinator.train(coordinator.global_arrays())
    assert reply.has_error() and WITHHELD in reply.error.reason
    assert "record 17" not in reply.error.reason and "Coverage" not in reply.error.reason
    assert spent_runs(Path(site["privacy-ledger"])) == 1
