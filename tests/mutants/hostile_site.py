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
EVALUATION = "strategies/evaluation_screening.py"
LIE = SITE_TESTS + "test_an_evaluation_reply_inconsistent_with_its_census_or_itself_is_a_failure"
SCALED_TO_PERFECT = (SITE_TESTS + "test_a_site_scaling_its_evaluation_to_a_perfect_score_fails_"
                     "at_the_census_size")
SELF_CHECKED = SITE_TESTS + "test_without_census_sizes_a_reply_is_still_checked_against_itself"
ROBUST_EVALUATION = (SITE_TESTS + "test_a_robust_evaluation_rule_keeps_one_consistent_liar_"
                     "inside_the_honest_range")
RULE_REPORTED = SITE_TESTS + "test_a_run_under_the_median_reports_it_and_keeps_the_pooled_figure"
POOLING = "strategies/evaluation_pooling.py"


def unchecked(name: str, kills: str | tuple[str, ...], condition: str):
    """The evaluation check whose `if` is `condition` removed."""
    return mutant(name, kills, EVALUATION, f"    if {condition}:\n", "    if False:\n")


MUTANTS = [
    mutant("evaluation replies unscreened",
           (LIE + "[accuracy-above-1]", SELF_CHECKED, SCALED_TO_PERFECT), SCREENING,
           "        problem = evaluation_problem(metrics, (expected.eval_sizes or {}).get(node),\n"
           "                                     expected.max_eval_weight_per_record)\n",
           "        problem = None\n"),
    unchecked("an evaluation size other than the census's", (
        LIE + "[inflated-weight]", LIE + "[accuracy-1-at-weight-1e9]", SCALED_TO_PERFECT),
        "size is not None and records != size"),
    unchecked("more tokens than its records hold",
              LIE + "[causal-lm-more-tokens-than-its-records-hold]",
              "per_record is not None and weight > records * per_record"),
    mutant("evaluation.rule ignored", (ROBUST_EVALUATION + "[median]",
                                       ROBUST_EVALUATION + "[trimmed-mean]"), POOLING,
           '    if spec.rule == "pooled":\n', "    if True:\n"),
    mutant("the evaluation's trimmed mean trims nothing", ROBUST_EVALUATION + "[trimmed-mean]",
           POOLING, "                                          spec.trim_fraction))",
           "                                          0.0))"),
    mutant("the server's evaluation rule not passed to the strategy", RULE_REPORTED,
           "server/federation.py", "evaluation=spec.evaluation, ", ""),
    mutant("the server bounds no evaluation weight by the task",
           SITE_TESTS + "test_the_server_bounds_a_causal_lm_evaluation_weight_by_max_length",
           "server/federation.py", "        max_eval_weight_per_record=task_for(spec.task)"
           ".eval_weight_per_record(\n            spec.model.max_length),\n", ""),
    unchecked("a split the census did not report", LIE + "[a-split-the-census-did-not-report]",
              "size == -1"),
    unchecked("a negative loss", LIE + "[causal-lm-perplexity-below-1]", "loss < 0"),
    unchecked("an accuracy outside [0, 1]", (LIE + "[accuracy-above-1]", SELF_CHECKED),
              "not 0 <= accuracy <= 1"),
    unchecked("class counts that do not sum to the records",
              LIE + "[counts-not-summing-to-records]",
              "sum(true) != records or sum(predicted) != records"),
    unchecked("hits above a class's count", LIE + "[counts-crafted-to-raise-macro-f1]",
              "any(c > min(t, q) for t, q, c in zip(true, predicted, correct))"),
    mutant("hits equal to a class's count rejected",
           SITE_TESTS + "test_a_consistent_evaluation_lie_at_its_census_size_is_accepted",
           EVALUATION, "    if any(c > min(t, q) for t, q, c in zip(true, predicted, correct)):\n",
           "    if any(c >= min(t, q) for t, q, c in zip(true, predicted, correct)):\n"),
    unchecked("a weight other than the records", LIE + "[weight-not-its-records]",
              "metrics[prefix + p.EVAL_WEIGHT] != records"),
    mutant("an accuracy other than the hits", LIE + "[accuracy-not-its-hits]", EVALUATION,
           "    if abs(metrics[prefix + p.EVAL_ACCURACY] - sum(correct) / records) > "
           "ACCURACY_TOLERANCE:\n", "    if False:\n"),
    mutant("the census shares no split sizes", SCALED_TO_PERFECT, "clients/client_app.py",
           "    if mode != p.SHARE_DP_ONLY:  # what its evaluation replies' sizes must be\n",
           "    if False:\n"),
    mutant("the strategy is not given the census's split sizes", SCALED_TO_PERFECT,
           "server/federation.py",
           "        eval_sizes={node_of[s]: n for s, n in planned.eval_sizes.items() "
           "if s in node_of},\n", "        eval_sizes=None,\n"),
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
    mutant("each robust rule paired with the median's runs without the liar",
           SITE_TESTS + "test_the_evaluation_table_pairs_each_rule_with_its_own_run_without_"
           "the_liar", "experiments/hostile_sites.py",
           'results["none"][rule]) for rule in EVALUATION_RULES]',
           'results["none"][EVALUATION_RULES[0]]) for rule in EVALUATION_RULES]'),
    mutant("the rules' pooled figures not compared",
           SITE_TESTS + "test_a_study_whose_rules_disagree_on_the_pooled_figure_stops",
           "experiments/hostile_sites.py",
           "            if not math.isclose(one[\"pooled\"], other[\"pooled\"], abs_tol=1e-9):",
           "            if False:"),
    mutant("the evaluation table counts its attacks' rounds, not evaluations",
           (SITE_TESTS + "test_the_guide_shows_the_committed_evaluation_rows",
            SITE_TESTS + "test_the_evaluation_table_pairs_each_rule_with_its_own_run_without_"
            "the_liar"), "experiments/hostile_sites.py",
           "_what_it_did(attack, runs, 'evaluations')", "_what_it_did(attack, runs)"),
]
