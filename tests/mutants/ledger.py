"""A site's own ledger (tests/test_site_ledger.py): it composes runs, declines past its
limits before charging, never loses a concurrent charge, and states its delta."""

from .mutant import mutant

LEDGER_TESTS = "test_site_ledger.py::"
LEDGER = "fed_dplora/site/ledger.py"
UNNOISED_CHECK = "            if not limits.allow_unnoised:\n                raise SiteDeclines("
ALMOST_NO_NOISE = (LEDGER_TESTS + "test_a_coordinator_asking_for_almost_no_noise_is_"
                   "declined_by_default_not_a_crash")
WRITE_BACK = "            yield accounts\n"
WRITTEN_ON_DECLINE = ("            try:\n                yield accounts\n"
                      "            except SiteDeclines:\n"
                      "                self.path.write_text(json.dumps(\n"
                      '                    {"version": FILE_VERSION, "accounts": accounts}))\n'
                      "                raise\n")

MUTANTS = [
    mutant("the lifetime limit reads this run only",
           LEDGER_TESTS + "test_two_runs_compose_at_the_site_and_the_second_is_declined_at_"
           "its_budget", LEDGER, "        spend = self.spend(account)\n        for limit",
           "        spend = self.spend(account, run)\n        for limit"),
    mutant("min-noise-multiplier ignored",
           LEDGER_TESTS + "test_a_server_asking_for_less_noise_than_the_site_allows_is_refused",
           LEDGER, "        if (limits.min_noise_multiplier is not None\n"
           "                and ask.noise_multiplier < limits.min_noise_multiplier):",
           "        if False:"),
    mutant("charges without the lock",
           LEDGER_TESTS + "test_concurrent_client_apps_never_lose_a_charge", LEDGER,
           "            fcntl.flock(lock, fcntl.LOCK_EX)\n", ""),
    mutant("a declined round is written",
           LEDGER_TESTS + "test_limits_are_checked_before_anything_is_charged", LEDGER,
           WRITE_BACK, WRITTEN_ON_DECLINE),
    mutant("un-noised rounds accepted without consent",
           (LEDGER_TESTS + "test_an_unnoised_round_is_charged_infinity_only_where_the_site_"
            "opts_in", ALMOST_NO_NOISE + "[ledger-default]",
            ALMOST_NO_NOISE + "[deployed-default]"), LEDGER, UNNOISED_CHECK,
           "            if False:\n                raise SiteDeclines("),
    mutant("an un-noised round charged nothing",
           LEDGER_TESTS + "test_an_unnoised_round_is_charged_infinity_only_where_the_site_"
           "opts_in", LEDGER,
           "            counts[UNNOISED] = counts.get(UNNOISED, 0) + 1\n            return",
           "            return"),
    mutant("delta ignores the records",
           LEDGER_TESTS + "test_delta_follows_the_plans_rule_for_the_sources_records", LEDGER,
           'delta = min(self.limits.max_delta or MAX_AUTO_DELTA, auto_delta([account["records"]]))',
           "delta = self.limits.max_delta or MAX_AUTO_DELTA"),
    mutant("show prints add/remove as replace-one",
           LEDGER_TESTS + "test_show_prints_each_run_and_the_total_in_both_relations", LEDGER,
           "epsilon {total.replace_one:.4f} ", "epsilon {total.add_remove:.4f} "),
]
