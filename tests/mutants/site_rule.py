"""The site rule (tests/test_site_rule.py, issue 47): nothing a deployed site sends
depends on its records except through DP."""

from .mutant import Edit, mutant

RULE = "test_site_rule.py::"
APP = "clients/client_app.py"
SITE = "fed_dplora/data/site.py"
DECLINE = ("    declined = _site_declines(spec, context, plan)\n    if declined:\n"
           "        return _declined(msg, declined)\n")

MUTANTS = [
    mutant("message label names unchecked against the declared set",
           RULE + "test_label_names_cannot_ask_which_labels_a_sites_records_hold",
           APP, "    if missing:\n        raise PublicRefusal(f\"the message's",
           "    if False:\n        raise PublicRefusal(f\"the message's"),
    mutant("records' labels unchecked against the declared set",
           RULE + "test_a_site_holding_an_undeclared_label_declines_whatever_the_message_"
           "names", APP, "    if not held <= declared:\n", "    if False:\n"),
    mutant("guards raise at a deployed site", RULE + "test_a_guard_cannot_be_aimed_at_a_label",
           APP, "kept, withhold=deployed, stop=stop)",
           "kept, withhold=False, stop=stop)"),
    mutant("split drawn from the run's seed",
           RULE + "test_the_run_config_cannot_choose_a_deployed_sites_split",
           SITE, "    if own is None:\n        return spec.seed",
           "    if True:\n        return spec.seed"),
    mutant("record cap from the run config",
           RULE + "test_evaluation_metrics_cover_the_sites_own_test_split",
           SITE, "max_records=own.max_records if own else data.max_records",
           "max_records=data.max_records"),
    mutant("the site's split-seed ignored", RULE + "test_a_deployed_site_owns_its_split_and_seed",
           SITE, "    if own.seed is not None:\n        return own.seed\n", ""),
    mutant("split sizes unchecked",
           RULE + "test_a_split_below_the_sites_minimum_is_refused_with_a_public_reason",
           SITE, "        own.check_sizes(splits)", "        pass"),
    mutant("undeclared labels read from the data",
           RULE + "test_a_deployed_site_that_declares_no_labels_refuses_the_census",
           APP, "    if not declared and not runtime.in_simulation():", "    if False:"),
    mutant("sigma unchecked",
           RULE + "test_a_non_finite_or_negative_sigma_is_declined_before_any_charge",
           "clients/local_site.py",
           "noise_multiplier=check_noise_multiplier(config.get(p.NOISE_MULTIPLIER)),",
           "noise_multiplier=config.get(p.NOISE_MULTIPLIER),"),
    mutant("message tensors unchecked",
           RULE + "test_a_message_with_non_finite_or_huge_tensors_is_declined_before_any_charge",
           APP, "    sent = to_arrays(msg.content[p.ARRAYS])\n    check_message_arrays(sent)",
           "    sent = to_arrays(msg.content[p.ARRAYS])"),
    mutant("non-finite run config floats accepted",
           tuple(RULE + "test_non_finite_run_config_values_are_refused_with_the_key" + p
                 for p in ("[privacy.max-grad-norm-nan]", "[privacy.target-epsilon-inf]")),
           "fed_dplora/config/parse.py",
           "    if isinstance(value, float) and not math.isfinite(value):", "    if False:"),
    mutant("clip norm unbounded",
           RULE + "test_non_finite_run_config_values_are_refused_with_the_key"
           "[privacy.max-grad-norm-1e+30]",
           "fed_dplora/config/parse.py", "value > MAX_GRAD_NORM", "False"),
    mutant("charged before the probe",
           RULE + "test_a_failed_wiring_check_on_the_probe_declines_before_any_charge",
           APP, DECLINE, "",
           Edit(APP, "    if deployed:\n        trainer.probe(",
                DECLINE + "    if deployed:\n        trainer.probe(")),
    mutant("a guard's error leaves the trainer",
           RULE + "test_a_guard_on_private_data_withholds_with_one_text_and_is_charged",
           "fed_dplora/site/trainer.py", "            if not withhold:\n                raise",
           "            raise"),
    mutant("non-finite per-sample gradients kept",
           ("test_dp_engine.py::test_a_non_finite_per_sample_gradient_is_zeroed_at_a_deployed_"
            "site", RULE + "test_a_record_with_a_nan_gradient_leaves_the_release_finite"),
           "fed_dplora/dp/engine.py",
           "        grad_samples, norms = self._finite(grad_samples, norms)\n", ""),
    mutant("accumulator takes infinite sigma",
           "test_dp_engine.py::test_the_accumulator_refuses_a_non_finite_sigma_or_clip_norm",
           "fed_dplora/dp/engine.py",
           "        if not (0 <= sigma < math.inf and 0 < clip < math.inf):",
           "        if sigma < 0 or clip <= 0:"),
]
