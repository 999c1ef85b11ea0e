"""The ledgers, calibration, plans and report, against independent computations."""

from __future__ import annotations

import json

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import pld, rdp
from opacus.accountants import RDPAccountant

from fed_dplora.privacy.calibrate import calibrate_dp_fedavg_noise, calibrate_dp_sgd_noise
from fed_dplora.privacy.events import dp_fedavg_round, dp_sgd_step
from fed_dplora.privacy.ledger import (FEDERATION, client_level_ledger, rdp_curve,
                                      sample_level_ledger)
from fed_dplora.privacy.plan import (PrivacyPlanError, auto_delta, plan_client_level,
                                     plan_sample_level)
from fed_dplora.privacy.accountants import (LIVE_PLD_DISCRETIZATION, PLD_MAX_RDP_EPSILON,
                                            RDP_ORDERS)
from fed_dplora.privacy.report import ledger_report, max_pld_epsilon

DELTA = 1e-5
REPLACE_ONE = dpa.privacy_accountant.NeighboringRelation.REPLACE_ONE
# (q, sigma, steps per round) of three rounds one client took part in
ROUNDS = [(0.08, 0.9, 10), (0.08, 0.9, 10), (0.05, 1.3, 20)]


def ledger_with(rounds, client="k"):
    ledger = sample_level_ledger(DELTA)
    for q, sigma, steps in rounds:
        ledger.record(client, dp_sgd_step(q, sigma), steps)
    return ledger


def test_sample_ledger_matches_step_by_step_dp_accounting():
    accountant = rdp.RdpAccountant()  # dp-accounting's own default orders
    for q, sigma, steps in ROUNDS:
        for _ in range(steps):  # one event per step, no self-composition shortcut
            accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)))
    independent = accountant.get_epsilon(DELTA)
    assert ledger_with(ROUNDS).epsilon("k") == pytest.approx(independent, rel=0.01)


def test_sample_ledger_matches_opacus_rdp_accountant():
    opacus = RDPAccountant()
    opacus.history = [(sigma, q, steps) for q, sigma, steps in ROUNDS]
    reference = opacus.get_epsilon(DELTA)
    assert ledger_with(ROUNDS).epsilon("k") == pytest.approx(reference, rel=0.01)


def test_ledgers_share_rdp_curves_per_relation_and_none_can_alter_them():
    event = dp_sgd_step(0.08, 0.9)
    first, second = ledger_with(ROUNDS), ledger_with(ROUNDS[:1], "other")
    assert rdp_curve(event, first.relation) is rdp_curve(event, second.relation)
    with pytest.raises(ValueError, match="read-only"):
        rdp_curve(event, first.relation)[0] = 0.0
    second.record("other", event, 1000)  # charging one ledger leaves the other's epsilon
    assert first.epsilon("k") == ledger_with(ROUNDS).epsilon("k")
    # Keyed by relation too: a fixed-size client sample's curve is replace-one's.
    fixed = dp_fedavg_round("fixed", 100, 10, 1.1)
    accountant = rdp.RdpAccountant(RDP_ORDERS, REPLACE_ONE)
    accountant.compose(fixed)
    np.testing.assert_allclose(rdp_curve(fixed, REPLACE_ONE), accountant.rdp)


def test_calibration_is_cached_only_for_identical_plans():
    sigma = calibrate_dp_sgd_noise(8.0, DELTA, 0.08, 100)
    assert calibrate_dp_sgd_noise(8.0, DELTA, 0.08, 100) == sigma
    assert calibrate_dp_sgd_noise(8.0, DELTA, 0.08, 200) > sigma  # more steps, more noise
    assert calibrate_dp_sgd_noise(4.0, DELTA, 0.08, 100) > sigma


# (clients N, expected per round m, z, rounds) as a DP-FedAvg run would charge them
CLIENT_ROUNDS = [(100, 10, 1.1, 30), (100, 10, 1.4, 20)]


def test_client_ledger_poisson_matches_step_by_step_dp_accounting_and_opacus():
    ledger = client_level_ledger(DELTA, "poisson")
    accountant = rdp.RdpAccountant()
    opacus = RDPAccountant()
    for n, m, z, rounds in CLIENT_ROUNDS:
        ledger.record(FEDERATION, dp_fedavg_round("poisson", n, m, z), rounds)
        accountant.compose(dpa.PoissonSampledDpEvent(m / n, dpa.GaussianDpEvent(z)), rounds)
        opacus.history.append((z, m / n, rounds))
    assert ledger.epsilon(FEDERATION) == pytest.approx(accountant.get_epsilon(DELTA), rel=0.01)
    assert ledger.epsilon(FEDERATION) == pytest.approx(opacus.get_epsilon(DELTA), rel=0.01)


def test_client_ledger_fixed_size_uses_replace_one_with_sensitivity_two_s():
    ledger = client_level_ledger(DELTA, "fixed")
    accountant = rdp.RdpAccountant(neighboring_relation=REPLACE_ONE)
    for n, m, z, rounds in CLIENT_ROUNDS:
        ledger.record(FEDERATION, dp_fedavg_round("fixed", n, m, z), rounds)
        # replacing one clipped update moves the sum by up to 2S: multiplier z / 2
        accountant.compose(dpa.SampledWithoutReplacementDpEvent(
            n, m, dpa.GaussianDpEvent(z / 2)), rounds)
    assert ledger.relation == REPLACE_ONE
    assert ledger.epsilon(FEDERATION) == pytest.approx(accountant.get_epsilon(DELTA), rel=0.01)
    poisson = client_level_ledger(DELTA, "poisson")
    for n, m, z, rounds in CLIENT_ROUNDS:
        poisson.record(FEDERATION, dp_fedavg_round("poisson", n, m, z), rounds)
    assert ledger.epsilon(FEDERATION) > poisson.epsilon(FEDERATION)


def test_both_levels_keep_separate_ledgers_with_their_own_delta():
    sample, client = ledger_with(ROUNDS), client_level_ledger(1e-3, "poisson")
    client.record(FEDERATION, dp_fedavg_round("poisson", 100, 10, 1.1), 30)
    independent = rdp.RdpAccountant()
    independent.compose(dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(1.1)), 30)
    assert client.epsilon(FEDERATION) == pytest.approx(independent.get_epsilon(1e-3), rel=0.01)
    # The sample ledger, at its own delta, is untouched by the client-level charges.
    steps = rdp.RdpAccountant()
    for q, sigma, count in ROUNDS:
        steps.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), count)
    assert sample.epsilon("k") == pytest.approx(steps.get_epsilon(DELTA), rel=0.01)
    assert sample.epsilon("k") != pytest.approx(client.epsilon(FEDERATION), rel=0.05)
    assert sample.kind == "sample" and client.kind == "client-poisson"


def test_pld_report_is_tighter_and_matches_an_independent_pld():
    ledger = ledger_with(ROUNDS, "a")
    ledger.record("b", dp_sgd_step(0.08, 0.9), 10)  # dominated by "a": fewer of the same
    accountant = pld.PLDAccountant(value_discretization_interval=1e-4)
    for q, sigma, steps in ROUNDS:
        accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    report = ledger_report(ledger, ["a", "b", "never"], 8.0)
    assert report["epsilon_pld_max"] == pytest.approx(accountant.get_epsilon(DELTA), rel=0.01)
    assert report["epsilon_pld_max"] <= report["epsilon_rdp_max"] == ledger.epsilon("a")
    assert report["epsilon_rdp"]["never"] == 0.0 and report["events"]["never"] == []
    fixed = client_level_ledger(DELTA, "fixed")
    fixed.record(FEDERATION, dp_fedavg_round("fixed", 100, 10, 1.1), 5)
    unsupported = ledger_report(fixed, [FEDERATION], 8.0)
    assert unsupported["epsilon_pld_max"] is None and "RDP" in unsupported["pld_note"]


def test_replace_one_is_reported_next_to_add_remove_and_matches_an_independent_pld():
    """n leaves each site, so the report states replace-one too (PLD supports Poisson
    sampling under replace-one): checked against dp-accounting composed by hand, for the
    report (fine grid), the live value (coarse grid: an upper bound, within 1e-3), and
    the site whose mechanism is weaker by add/remove but not by replace-one."""
    ledger = sample_level_ledger(DELTA)
    ledger.record("small-q", dp_sgd_step(0.02, 0.8), 50)
    ledger.record("large-q", dp_sgd_step(0.08, 0.7849), 50)
    expected = {}
    for site, (q, sigma) in {"small-q": (0.02, 0.8), "large-q": (0.08, 0.7849)}.items():
        accountant = pld.PLDAccountant(REPLACE_ONE, value_discretization_interval=1e-4)
        accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), 50)
        expected[site] = accountant.get_epsilon(DELTA)
    report = ledger_report(ledger, ["small-q", "large-q"], 8.0)
    assert report["epsilon_pld_replace_one_max"] == pytest.approx(max(expected.values()),
                                                                  rel=1e-3)
    assert report["epsilon_pld_replace_one_max"] > report["epsilon_pld_max"]
    live = max_pld_epsilon(ledger, REPLACE_ONE, LIVE_PLD_DISCRETIZATION)
    assert max(expected.values()) <= live <= max(expected.values()) + 1e-3


def _dp_accounting(accountant, q: float, sigma: float, steps: int) -> float:
    accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(DELTA)


def test_a_noise_multiplier_too_small_for_a_pld_reads_infinite_instead_of_filling_memory():
    """sigma 0.0044 (the audit's sigma/1000 control; q 0.1, 100 steps) once grew a PLD to
    23 GB. dp-accounting's RDP puts it far above the cap, so its PLD epsilon is infinite,
    an upper bound, in both relations. Below the cap (sigma/10, RDP epsilon about 51) the
    PLD is still computed and equals dp-accounting's own."""
    q, steps = 0.1, 100
    assert _dp_accounting(rdp.RdpAccountant(), q, 0.0044, steps) > PLD_MAX_RDP_EPSILON
    tiny = sample_level_ledger(DELTA)
    tiny.record("k", dp_sgd_step(q, 0.0044), steps)
    add_or_remove = dpa.privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE
    for relation in (REPLACE_ONE, add_or_remove):
        assert max_pld_epsilon(tiny, relation, LIVE_PLD_DISCRETIZATION) == float("inf")
    assert _dp_accounting(rdp.RdpAccountant(), q, 0.4426, steps) < PLD_MAX_RDP_EPSILON
    fine = pld.PLDAccountant(REPLACE_ONE, value_discretization_interval=1e-3)
    expected = _dp_accounting(fine, q, 0.4426, steps)
    small = sample_level_ledger(DELTA)
    small.record("k", dp_sgd_step(q, 0.4426), steps)
    assert max_pld_epsilon(small, REPLACE_ONE, 1e-3) == pytest.approx(expected, rel=1e-9)


def test_federation_epsilon_is_the_max_over_clients_and_absent_client_is_zero():
    ledger = ledger_with(ROUNDS[:1], "a")
    for q, sigma, steps in ROUNDS:
        ledger.record("b", dp_sgd_step(q, sigma), steps)
    assert ledger.epsilon("never-selected") == 0.0
    assert ledger.max_epsilon() == ledger.epsilon("b") > ledger.epsilon("a") > 0
    assert ledger.mean_epsilon(["a", "b", "never-selected"]) == pytest.approx(
        (ledger.epsilon("a") + ledger.epsilon("b")) / 3)


@pytest.mark.parametrize("kind", ["sample", "poisson", "fixed"])
def test_epsilon_grows_with_rounds_and_shrinks_with_noise(kind):
    def eps(noise, rounds):
        if kind == "sample":
            return ledger_with([(0.08, noise, 10)] * rounds).epsilon("k")
        ledger = client_level_ledger(DELTA, kind)
        ledger.record(FEDERATION, dp_fedavg_round(kind, 50, 5, noise), rounds)
        return ledger.epsilon(FEDERATION)
    by_rounds = [eps(1.0, r) for r in range(1, 6)]
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:]))
    by_noise = [eps(s, 5) for s in (0.6, 0.9, 1.5, 3.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:]))


def test_state_round_trip_and_mismatch():
    ledger = ledger_with(ROUNDS, "a")
    ledger.record("b", dp_sgd_step(0.08, 0.9), 10)
    copy = sample_level_ledger(DELTA)
    copy.restore(json.loads(json.dumps(ledger.state())))  # as a checkpoint holds it
    assert copy.per_account() == ledger.per_account()
    with pytest.raises(ValueError, match="does not match"):
        sample_level_ledger(2e-5).restore(ledger.state())


@pytest.mark.parametrize("target,q,steps", [(8.0, 0.08, 50), (3.0, 0.02, 300),
                                            (1.0, 0.1, 20)])
def test_calibrated_dp_sgd_noise_lands_within_two_percent_below_target(target, q, steps):
    sigma = calibrate_dp_sgd_noise(target, DELTA, q, steps)
    spent = ledger_with([(q, sigma, steps)]).epsilon("k")
    assert target * 0.98 <= spent <= target


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
@pytest.mark.parametrize("target,n,m,rounds", [(8.0, 10, 3, 20), (1.0, 100, 10, 50),
                                               (3.0, 3, 3, 5)])
def test_calibrated_dp_fedavg_noise_lands_within_two_percent_below_target(
        sampling, target, n, m, rounds):
    delta = 1 / (10 * n)
    z = calibrate_dp_fedavg_noise(target, delta, sampling, n, m, rounds)
    ledger = client_level_ledger(delta, sampling)
    ledger.record(FEDERATION, dp_fedavg_round(sampling, n, m, z), rounds)
    assert target * 0.98 <= ledger.epsilon(FEDERATION) <= target


def test_invalid_mechanism_is_refused_before_any_state_changes():
    with pytest.raises(ValueError, match="noise multiplier"):
        dp_sgd_step(0.1, 0.0)  # "no noise, no charge" is not an option
    with pytest.raises(ValueError, match="expected clients"):
        dp_fedavg_round("fixed", 5, 6, 1.0)
    ledger = sample_level_ledger(DELTA)
    with pytest.raises(ValueError, match="charges PoissonSampledDpEvent events"):
        ledger.record_many({"a": (dp_sgd_step(0.1, 1.0), 10),
                            "b": (dp_fedavg_round("fixed", 5, 2, 1.0), 1)})
    assert ledger.counts == {} and ledger.max_epsilon() == 0.0  # all or nothing
    ledger.record_many({})  # a round that charged nobody
    assert ledger.counts == {}
    client = client_level_ledger(DELTA, "fixed")
    with pytest.raises(ValueError, match="charges SampledWithoutReplacementDpEvent"):
        client.record(FEDERATION, dp_sgd_step(0.1, 1.0), 1)
    assert client.counts == {}
    foreign = {"type": "LaplaceDpEvent", "parameter": 1.0}
    with pytest.raises(ValueError, match="not a saved ledger event"):
        ledger.restore({"kind": "sample", "delta": DELTA, "counts": {"k": [[foreign, 3]]}})


def test_sample_plan_calibrates_each_client_and_refuses_delta_at_or_above_one_over_n():
    plan = plan_sample_level(8.0, None, 64, {"small": 640, "large": 6400}, 50)
    assert plan.delta == auto_delta([640, 6400]) == 1e-5  # 1/(10 n) would be 1.6e-5
    assert auto_delta([200_000, 1000]) == 1 / 2_000_000  # below 1/(10 n) for every n
    assert plan.sampling_probability == {"small": 0.1, "large": 0.01}
    assert plan.noise_multiplier["small"] > plan.noise_multiplier["large"]
    for client in ("small", "large"):
        ledger = sample_level_ledger(plan.delta)
        ledger.record(client, plan.step_event(client), 50)
        assert 8.0 * 0.98 <= ledger.epsilon(client) <= 8.0
    with pytest.raises(PrivacyPlanError, match="privacy.delta.*small"):
        plan_sample_level(8.0, 1 / 640, 64, {"small": 640, "large": 6400}, 50)
    fixed = plan_sample_level(8.0, None, 64, {"a": 640}, 50, noise_multiplier=0.5)
    assert fixed.noise_multiplier == {"a": 0.5}


def test_client_plan_calibrates_z_and_refuses_delta_at_or_above_one_over_clients():
    plan = plan_client_level(8.0, None, "poisson", 20, 5, 10, clip_norm=0.5)
    assert plan.delta == 1e-5  # 1/(10 N) = 0.005 would be far too weak for 20 clients
    assert plan.noise_std == pytest.approx(plan.noise_multiplier * 0.5 / 5)
    ledger = client_level_ledger(plan.delta, "poisson")
    ledger.record(FEDERATION, plan.round_event, 10)
    assert 8.0 * 0.98 <= ledger.epsilon(FEDERATION) <= 8.0
    with pytest.raises(PrivacyPlanError, match="client-delta.*1/20"):
        plan_client_level(8.0, 0.05, "poisson", 20, 5, 10, clip_norm=0.5)
    with pytest.raises(PrivacyPlanError, match="clients-per-round=30"):
        plan_client_level(8.0, None, "fixed", 20, 30, 10, clip_norm=0.5)


def test_budget_check_sees_the_round_that_would_overspend():
    plan = plan_sample_level(4.0, 1e-5, 64, {"k": 1000}, 30)
    ledger = sample_level_ledger(plan.delta)
    for _ in range(3):  # the three planned rounds of 10 steps fit
        assert ledger.epsilon_if("k", plan.step_event("k"), 10) <= 4.0
        ledger.record("k", plan.step_event("k"), 10)
    assert ledger.epsilon_if("k", plan.step_event("k"), 10) > 4.0  # a fourth would not
    assert ledger.epsilon("k") <= 4.0


def test_vectorized_rdp_conversion_equals_dp_accounting_value_for_value():
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    from fed_dplora.privacy.accountants import RDP_ORDERS
    from fed_dplora.privacy.ledger import epsilons
    ledger = sample_level_ledger(DELTA)
    rows = [count * ledger._curve(dp_sgd_step(q, sigma)) for (q, sigma), count in
            [((0.01, 0.6), 1), ((0.08, 0.9), 50), ((0.5, 2.0), 1000), ((1.0, 0.3), 10),
             ((1e-4, 5.0), 1)]]
    rows.append(np.zeros(len(RDP_ORDERS)))
    for delta in (1e-3, 1e-5, 1e-9):
        expected = [compute_epsilon(RDP_ORDERS, r, delta)[0] for r in rows]
        np.testing.assert_allclose(epsilons(np.stack(rows), delta), expected, rtol=1e-12)
