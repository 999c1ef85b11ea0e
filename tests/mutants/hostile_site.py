"""A registered site that lies (tests/test_hostile_site.py): screening by the census and
the DP-aware update bound, and robust rules and weight caps for what passes them."""

from .mutant import mutant

SITE_TESTS = "test_hostile_site.py::"
SCREENING = "strategies/screening.py"
BOUND = "fed_dplora/dp/update_bound.py"
COMBINE = "strategies/lora_fedavg.py"
OUTSIDE = SITE_TESTS + "test_a_lie_outside_what_an_honest_site_can_send_is_a_failure"
ROBUST = (SITE_TESTS
          + "test_one_hostile_site_of_five_cannot_push_a_robust_rule_outside_the_honest_range")
CENSUS_LIE = SITE_TESTS + "test_a_weight_cap_and_uniform_weights_bound_a_census_lie"
NORM_CHECK = "    if norm > bound:\n"

MUTANTS = [
    mutant("the update bound unchecked",
           tuple(f"{OUTSIDE}[{attack}-exceeds]" for attack in ("scaled", "garbage")),
           SCREENING, NORM_CHECK, "    if False:\n"),
    mutant("a reported size trusted over the census", OUTSIDE + "[inflated-census size]",
           SCREENING, "    if size is not None and metrics[p.NUM_EXAMPLES] != size:",
           "    if False:"),
    # Sign-flipped and replayed lies sit well inside the bound: no screening mutant
    # short of rejecting honest replies reaches them (their rows document the limit).
    mutant("the update bound halved",
           SITE_TESTS + "test_a_lie_inside_the_bound_is_accepted[at-the-bound]",
           SCREENING, NORM_CHECK, "    if norm > bound / 2:\n"),
    # The aligned-signal term dominates these plans' bounds, so a weaker noise term
    # still bounds every simulated update; the real, noise-dominated update sees it.
    mutant("the bound's signal without its momentum weight",
           SITE_TESTS + "test_honest_updates_stay_within_the_bound_at_its_stated_probability",
           BOUND, "    signal_part = weights[0] * update.clip_norm * sampled",
           "    signal_part = update.clip_norm * sampled"),
    mutant("the bound's noise without its momentum weights",
           SITE_TESTS + "test_a_real_dp_sgd_update_comes_close_to_its_bound_but_not_past_it",
           BOUND, "                  * math.sqrt(sum(w * w for w in weights)) * noise)",
           "                  * noise)"),
    mutant("the bound doubled",
           SITE_TESTS + "test_a_real_dp_sgd_update_comes_close_to_its_bound_but_not_past_it",
           BOUND, "    return update.learning_rate / update.expected_batch * (signal_part",
           "    return 2 * update.learning_rate / update.expected_batch * (signal_part"),
    mutant("the median is a mean",
           (SITE_TESTS + "test_robust_rules_are_flowers_coordinate_wise_statistics",
            ROBUST + "[median]"), COMBINE,
           "np.median(v, axis=0).astype(np.float32)", "np.mean(v, axis=0).astype(np.float32)"),
    mutant("the trimmed mean trims nothing",
           (SITE_TESTS + "test_robust_rules_are_flowers_coordinate_wise_statistics",
            ROBUST + "[trimmed-mean]"), COMBINE,
           "trim_mean(v, self.aggregation.trim_fraction)", "trim_mean(v, 0.0)"),
    mutant("no weight cap", CENSUS_LIE, "fed_dplora/aggregation.py",
           "    if max(shares) <= max_share:\n        return list(weights)",
           "    if True:\n        return list(weights)"),
    mutant("uniform weights ignored", CENSUS_LIE, COMBINE,
           '        if self.aggregation.weights == "uniform":', "        if False:"),
    mutant("client-level DP with a robust rule",
           SITE_TESTS + "test_client_level_dp_accepts_only_the_mean",
           "fed_dplora/config/parse.py",
           '    if spec.privacy.client_level and spec.aggregation.rule != "mean":',
           "    if False:"),
    mutant("an interval across zero called shown",
           SITE_TESTS + "test_the_study_tables_pair_by_seed_and_say_not_shown_where_zero_is_"
           "inside", "experiments/hostile_sites.py",
           '    shown = "" if abs(mean) > half else ", not shown"', '    shown = ""'),
]
