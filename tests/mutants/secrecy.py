"""What the coordinator cannot waive or hide (tests/test_secrecy.py): secret sampling,
fresh randomness decided by each site, a charge for every release, and what a deployed
site shares."""

from .mutant import mutant

SECRECY = "test_secrecy.py::"
REPORTING = "server/reporting.py"
RUNTIME = "clients/runtime.py"
APP = "clients/client_app.py"
TRAINER = "fed_dplora/site/trainer.py"
NO_RUN_FILE = SECRECY + "test_with_secret_sampling_no_run_file_tells_who_trained[secret]"
FRESH = SECRECY + "test_a_deployed_site_draws_fresh_randomness_whatever_the_server_asks"
FRESH_NOISE, FRESH_SAMPLING = FRESH + "[noise-default]", FRESH + "[sampling-default]"
CRASHES = ("_charge-False", "_mark_released-False", "_evaluate-True")
RESUME = "server/resume.py"
CHARGED = SECRECY + "test_every_release_is_charged_whatever_crashes_when"
SHARES = SECRECY + "test_a_deployed_site_shares_only_what_the_accountant_needs_unless_it_opts_in"

MUTANTS = [
    mutant("metrics line unscrubbed", NO_RUN_FILE, REPORTING,
           "    if not secret_sampling:\n        return row",
           "    if True:\n        return row"),
    mutant("site ids missing from the participation fields", NO_RUN_FILE, REPORTING,
           'PARTICIPATION_FIELDS = ("clients", ', "PARTICIPATION_FIELDS = ("),
    mutant("checkpoint keeps each site's own ledger", NO_RUN_FILE, REPORTING,
           "    if not secure:\n        return state", "    if True:\n        return state"),
    mutant("report shows each site's own epsilon", NO_RUN_FILE, REPORTING,
           "accountant.report(planned.sites, charged_rounds if secure else None)",
           "accountant.report(planned.sites, None)"),
    mutant("seeded sampling unannounced",
           SECRECY + "test_a_seeded_simulation_says_what_its_sampling_assumes", REPORTING,
           '    if not secure:\n        report["sampling_note"]',
           '    if False:\n        report["sampling_note"]'),
    mutant("deployed rounds planned seeded", (FRESH_NOISE, FRESH_SAMPLING),
           "clients/local_site.py", "secure_noise=fresh_randomness,", "secure_noise=False,"),
    mutant("a deployed site follows the server's randomness", (FRESH_NOISE, FRESH_SAMPLING),
           RUNTIME, "    if not in_simulation():\n        return SEEDED_BY_SITE",
           "    if False:\n        return SEEDED_BY_SITE"),
    mutant("noise drawn seeded", FRESH_NOISE, TRAINER,
           "random_source(plan.secure_noise, plan.seed + 1, self.device)",
           "random_source(False, plan.seed + 1, self.device)"),
    mutant("sampling drawn seeded", FRESH_SAMPLING, TRAINER,
           "random_source(plan.secure_noise, plan.seed))",
           "random_source(False, plan.seed))"),
    mutant("opted-out sites not void",
           SECRECY + "test_the_report_says_which_deployed_sites_drew_fresh_randomness",
           REPORTING, "void = seeded if sample_noise else", "void = [] if sample_noise else"),
    mutant("simulated sites keep a default ledger",
           SECRECY + "test_a_simulated_site_keeps_no_ledger_unless_asked", RUNTIME,
           "        if in_simulation():\n            return None\n", ""),
    mutant("anything without Ray's actor counts as simulated",
           SECRECY + "test_flowers_simulation_is_detected_in_process_and_nothing_else_is",
           RUNTIME, 'or "ray" not in sys.modules:\n        return False',
           'or "ray" not in sys.modules:\n        return True'),
    mutant("an interrupted round's fresh sites not charged on resume",
           tuple(f"{CHARGED}[one-site-fresh-{crash}]" for crash in CRASHES),
           RESUME, 'accountant.charge_planned({site: charges[site] for site in '
           'fresh if site in charges})', "pass"),
    mutant("an interrupted round not counted as lost on resume",
           tuple(f"{CHARGED}[{sites}-{crash}]" for sites in ("secure", "one-site-fresh")
                 for crash in CRASHES),
           RESUME, "        checkpoint.lost_rounds.append(pending[\"round\"])\n", ""),
    mutant("a deployed site shares its training metrics", SHARES, APP,
           "    if runtime.share_metrics(context.node_config) == p.SHARE_ALL:\n"
           "        metrics.update(", "    if True:\n        metrics.update("),
    mutant("a dp-only site shares evaluation",
           SECRECY + "test_a_dp_only_site_refuses_the_evaluation_a_coordinator_sends_anyway", APP,
           "    if runtime.share_metrics(context.node_config) == p.SHARE_DP_ONLY:\n"
           "        raise PublicRefusal", "    if False:\n        raise PublicRefusal"),
    mutant("an error's text leaves the site",
           SECRECY + "test_an_error_leaves_a_site_as_its_type_alone_unless_it_shares_all"
           "[dp-only-False]", APP, "            if mode == p.SHARE_ALL:\n                raise",
           "            raise"),
]
