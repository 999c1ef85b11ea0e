"""The bounded site (tests/test_site_limits.py, issue 48): what any message can cost a
deployed site."""

from .mutant import mutant

LIMITS = "test_site_limits.py::"
APP = "clients/client_app.py"
LEDGER = "fed_dplora/site/ledger.py"
KILLED = "test_a_site_killed_mid_round_has_charged_exactly_what_it_could_have_released"

MUTANTS = [
    mutant("no floor under weak noise",
           LIMITS + "test_weak_noise_at_a_default_site_is_declined_before_any_charge",
           "fed_dplora/site/limits.py",
           "return noise_multiplier is None or not noise_multiplier >= UNNOISED_BELOW",
           "return noise_multiplier is None"),
    mutant("no default budget at a deployed site",
           LIMITS + "test_allow_unnoised_alone_keeps_the_default_finite_budget",
           "clients/runtime.py", "        return None if in_simulation() else default",
           "        return None"),
    mutant("work caps unchecked", LIMITS + "test_work_past_a_cap_is_declined_before_any_charge",
           APP, "    limits.check(plan.local_steps, plan.batch_size)\n", ""),
    mutant("steps never check for a stop",
           LIMITS + "test_a_revoked_task_stops_within_one_step_and_releases_nothing",
           "fed_dplora/site/trainer.py", "            stop()\n            stats, loss",
           "            stats, loss"),
    mutant("wall-time cap ignored", LIMITS + "test_a_task_past_its_wall_time_cap_stops",
           "fed_dplora/site/limits.py", "if time.monotonic() > deadline:", "if False:"),
    mutant("heartbeat only logs",
           LIMITS + "test_the_site_runners_heartbeat_revokes_an_unacknowledged_task",
           "clients/site_runner.py", "            runtime.revoke_task()\n", ""),
    mutant("ledger unbounded",
           LIMITS + "test_the_ledger_refuses_a_pathological_plan_without_computing_it",
           LEDGER, "if sum(events.values()) > MAX_ACCOUNT_STEPS or len(events) > "
           "MAX_ACCOUNT_EVENTS:", "if False:"),
    mutant("rounds uncounted", LIMITS + "test_a_run_past_the_sites_max_rounds_is_declined",
           LEDGER, "if limit is not None and counts[ROUNDS] > limit:", "if False:"),
    mutant("charged before the data is prepared",
           (LIMITS + "test_a_round_that_fails_before_its_first_step_is_not_charged",
            LIMITS + KILLED + "[prepare]", LIMITS + KILLED + "[probe]"),
           APP, "    trainer, (train_data, _, _) = _prepare(spec, context, config)\n",
           "    _site_declines(spec, context, plan)\n"
           "    trainer, (train_data, _, _) = _prepare(spec, context, config)\n"),
    mutant("no model allow-list",
           LIMITS + "test_a_model_off_the_allow_list_gets_one_refusal_whatever_the_path",
           APP, "if spec.model.name not in runtime.allowed_models(context.node_config):",
           "if False:"),
    mutant("hub left online",
           LIMITS + "test_a_deployed_site_keeps_the_hub_offline_unless_it_allows_it",
           APP, "        runtime.keep_hub_offline(context.node_config)\n", ""),
    mutant("bundle member sizes unchecked", LIMITS + "test_a_zip_bomb_is_refused_in_bounded_memory",
           "clients/bundle_check.py", "            _check_sizes(wanted)\n", ""),
    mutant("every bundle member read", LIMITS + "test_a_zip_bomb_is_refused_in_bounded_memory",
           "clients/bundle_check.py",
           'wanted = [m for m in members if m.filename == "pyproject.toml" or (',
           "wanted = [m for m in members if True or ("),
    mutant("account keyed by the data's content",
           LIMITS + "test_an_appended_row_keeps_the_sites_ledger_account",
           "fed_dplora/data/site.py",
           '        key = hashlib.sha256(f"account\\x1f{name}".encode()).hexdigest()',
           "        key = _files_digest(path)"),
    mutant("the unnoised floor raised to real noise",
           LIMITS + "test_the_unnoised_floor_is_a_weak_guarantee",
           "fed_dplora/site/limits.py", "UNNOISED_BELOW = 0.3", "UNNOISED_BELOW = 1.0"),
    mutant("charged after training", LIMITS + KILLED + "[_apply]",
           APP, "    declined = _site_declines(spec, context, plan)\n"
           "    if declined:\n        return _declined(msg, declined)\n"
           "    arrays, report = trainer.train(sent, plan, train_data, kept, withhold=deployed, "
           "stop=stop)\n",
           "    arrays, report = trainer.train(sent, plan, train_data, kept, withhold=deployed, "
           "stop=stop)\n    declined = _site_declines(spec, context, plan)\n"
           "    if declined:\n        return _declined(msg, declined)\n"),
]
