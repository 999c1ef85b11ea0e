"""The sample-level ledger and calibration, against independent computations."""

from __future__ import annotations

import dp_accounting as dpa
import pytest
from dp_accounting import pld, rdp
from opacus.accountants import RDPAccountant

from fed_dplora.privacy.calibrate import calibrate_dp_sgd_noise
from fed_dplora.privacy.ledger import SampleLevelLedger
from fed_dplora.privacy.plan import PrivacyPlanError, auto_delta, plan_sample_level

DELTA = 1e-5
# (q, sigma, steps per round) of three rounds one client took part in
ROUNDS = [(0.08, 0.9, 10), (0.08, 0.9, 10), (0.05, 1.3, 20)]


def ledger_with(rounds, client="k") -> SampleLevelLedger:
    ledger = SampleLevelLedger(DELTA)
    for q, sigma, steps in rounds:
        ledger.record(client, q, sigma, steps)
    return ledger


def test_ledger_matches_step_by_step_dp_accounting():
    accountant = rdp.RdpAccountant()  # dp-accounting's own default orders
    for q, sigma, steps in ROUNDS:
        for _ in range(steps):  # one event per step, no self-composition shortcut
            accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)))
    independent = accountant.get_epsilon(DELTA)
    assert ledger_with(ROUNDS).epsilon("k") == pytest.approx(independent, rel=0.01)


def test_ledger_matches_opacus_rdp_accountant():
    opacus = RDPAccountant()
    opacus.history = [(sigma, q, steps) for q, sigma, steps in ROUNDS]
    reference = opacus.get_epsilon(DELTA)
    assert ledger_with(ROUNDS).epsilon("k") == pytest.approx(reference, rel=0.01)


def test_ledger_is_an_upper_bound_on_the_tighter_pld_accountant():
    accountant = pld.PLDAccountant(value_discretization_interval=1e-4)
    for q, sigma, steps in ROUNDS:
        accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    assert accountant.get_epsilon(DELTA) <= ledger_with(ROUNDS).epsilon("k")


def test_federation_epsilon_is_the_max_over_clients_and_absent_client_is_zero():
    ledger = ledger_with(ROUNDS[:1], "a")
    for q, sigma, steps in ROUNDS:
        ledger.record("b", q, sigma, steps)
    assert ledger.epsilon("never-selected") == 0.0
    assert ledger.max_epsilon() == ledger.epsilon("b") > ledger.epsilon("a") > 0


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    eps = [ledger_with([(0.08, 1.0, 10)] * r).epsilon("k") for r in range(1, 6)]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    by_noise = [ledger_with([(0.08, s, 50)]).epsilon("k") for s in (0.6, 0.9, 1.5, 3.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:]))


@pytest.mark.parametrize("target,q,steps", [(8.0, 0.08, 50), (3.0, 0.02, 300),
                                            (1.0, 0.1, 20)])
def test_calibrated_noise_lands_within_two_percent_below_target(target, q, steps):
    sigma = calibrate_dp_sgd_noise(target, DELTA, q, steps)
    spent = ledger_with([(q, sigma, steps)]).epsilon("k")
    assert target * 0.98 <= spent <= target


def test_invalid_mechanism_is_refused_before_any_state_changes():
    ledger = SampleLevelLedger(DELTA)
    with pytest.raises(ValueError, match="noise multiplier"):
        ledger.record("k", 0.1, 0.0, 10)  # "no noise, no charge" is not an option
    assert ledger.steps == {} and ledger.max_epsilon() == 0.0


def test_plan_calibrates_each_client_and_refuses_delta_at_or_above_one_over_n():
    plan = plan_sample_level(8.0, None, 64, {"small": 640, "large": 6400}, 50)
    assert plan.delta == auto_delta({"small": 640, "large": 6400}) == 1 / 64000
    assert plan.sampling_probability == {"small": 0.1, "large": 0.01}
    assert plan.noise_multiplier["small"] > plan.noise_multiplier["large"]
    for client in ("small", "large"):
        ledger = SampleLevelLedger(plan.delta)
        ledger.record(client, plan.sampling_probability[client],
                      plan.noise_multiplier[client], 50)
        assert 8.0 * 0.98 <= ledger.epsilon(client) <= 8.0
    with pytest.raises(PrivacyPlanError, match="privacy.delta.*small"):
        plan_sample_level(8.0, 1 / 640, 64, {"small": 640, "large": 6400}, 50)


def test_budget_check_sees_the_round_that_would_overspend():
    plan = plan_sample_level(4.0, 1e-5, 64, {"k": 1000}, 30)
    ledger = SampleLevelLedger(plan.delta)
    q, sigma = plan.sampling_probability["k"], plan.noise_multiplier["k"]
    for _ in range(3):  # the three planned rounds of 10 steps fit
        assert ledger.epsilon_if("k", q, sigma, 10) <= 4.0
        ledger.record("k", q, sigma, 10)
    assert ledger.epsilon_if("k", q, sigma, 10) > 4.0  # a fourth would not
    assert ledger.epsilon("k") <= 4.0
