"""A hostile or careless coordinator against the real ClientApp
(tests/test_hostile_coordinator.py): labels, columns, accounts, un-noised rounds, what a
decline says, and what secret sampling keeps out of the run folder."""

from .mutant import mutant

COORDINATOR = "test_hostile_coordinator.py::"
SITE = "fed_dplora/data/site.py"
RUNTIME = "clients/runtime.py"
LEDGER = "fed_dplora/site/ledger.py"
ACCOUNT_KEY = 'key = hashlib.sha256(f"account\\x1f{name}".encode()).hexdigest()'
ONE_ACCOUNT = (COORDINATOR
               + "test_runs_with_other_seeds_caps_fractions_and_columns_charge_one_account")
LABEL_LIKE = COORDINATOR + "test_a_label_column_of_ids_or_long_notes_is_withheld_at_the_census"
SHAPE_CHECK = "    if len(found) > MAX_SHARED_LABELS or longest > MAX_LABEL_CHARS:"
VOID = "void = seeded if sample_noise else sorted(randomness)"
OPTED_IN = (COORDINATOR
            + "test_a_site_that_opts_into_unnoised_rounds_is_charged_infinity_and_listed_void")


def keyed_also_by(what: str):
    """The deployed account's key mixed with a run-config value."""
    return mutant(f"account keyed by the run's {what}", ONE_ACCOUNT, SITE, ACCOUNT_KEY,
                  ACCOUNT_KEY.replace("{name}", "{name}\\x1f{spec." + what + "}"))


MUTANTS = [
    mutant("label-like values unchecked",
           COORDINATOR + "test_a_run_config_naming_the_text_column_as_labels_sends_no_record",
           SITE, SHAPE_CHECK, "    if False:"),
    mutant("label count unchecked", LABEL_LIKE + "[ids]", SITE, SHAPE_CHECK,
           "    if longest > MAX_LABEL_CHARS:"),
    mutant("label length unchecked", LABEL_LIKE + "[notes]", SITE, SHAPE_CHECK,
           "    if len(found) > MAX_SHARED_LABELS:"),
    mutant("a deployed site reads the run config's columns",
           COORDINATOR + "test_a_deployed_site_reads_the_columns_it_declared_whatever_the_run_"
           "config_says", RUNTIME,
           '        columns = {"text_column": columns["text_column"] or "text",\n'
           '                   "label_column": columns["label_column"] or "label"}\n', ""),
    mutant("undeclared label values sent",
           COORDINATOR + "test_labels_outside_the_declared_set_are_not_sent", SITE,
           "        outside = found - set(declared)", "        outside = set()"),
    mutant("a deployed site without a data-path trains the run's data",
           COORDINATOR + "test_a_deployed_supernode_without_a_data_path_is_never_trained",
           RUNTIME, "        if not path:\n            raise DataError(",
           "        if False:\n            raise DataError("),
    keyed_also_by("seed"),
    keyed_also_by("data.max_records"),
    keyed_also_by("data.label_column"),
    mutant("a deployed site trains un-noised rounds",
           tuple(COORDINATOR + "test_a_deployed_site_declines_rounds_without_sample_level_noise"
                 f"[{level}]" for level in ("none", "client")), LEDGER,
           "            if not limits.allow_unnoised:\n                raise SiteDeclines(",
           "            if False:\n                raise SiteDeclines("),
    mutant("an un-noised round charged nothing", OPTED_IN, LEDGER,
           "            counts[UNNOISED] = counts.get(UNNOISED, 0) + 1\n            return",
           "            return"),
    mutant("only opted-out sites listed void",
           (OPTED_IN, COORDINATOR + "test_no_sample_level_noise_lists_every_site_as_void"),
           "server/reporting.py", VOID, "void = seeded"),
    mutant("seeded client-level DP outside the simulation",
           COORDINATOR + "test_seeded_client_level_dp_is_refused_outside_the_simulation",
           "server/server_app.py",
           "    if not spec.privacy.secure_noise and spec.privacy.client_level and not simulated:",
           "    if False:"),
    mutant("the final checkpoint keeps each site's own ledger",
           COORDINATOR + "test_with_secret_sampling_no_shared_file_tells_who_trained_or_how_often",
           "server/reporting.py", "    if not secure:\n        return state",
           "    if True:\n        return state"),
    mutant("a dp-only site says why it declines",
           COORDINATOR + "test_a_dp_only_site_says_only_that_it_declines", "clients/client_app.py",
           "return str(why) if shared else p.DECLINED_WITHHELD", "return str(why)"),
    mutant("a resumed run forgets the sites it excluded",
           COORDINATOR
           + "test_a_seeded_replay_asks_the_sites_the_crashed_attempt_would_have_asked",
           "server/federation.py",
           "            lora.health.restore(state.excluded, state.failure_streaks, "
           "planned.node_of)", "            pass"),
]
