"""The site runner (tests/test_site_runner.py, tests/test_site_runner_revoked.py): it runs
only the installed release, refuses every bundle that would change it, and a revoked or
dropped task fails alone."""

from .mutant import mutant

RUNNER_TESTS = "test_site_runner.py::"
REVOKED_TESTS = "test_site_runner_revoked.py::"
RUNNER = "clients/site_runner.py"
CHECK = "clients/bundle_check.py"
HOSTILE = (RUNNER_TESTS
           + "test_a_site_runner_refuses_every_hostile_bundle_and_runs_none_of_its_code")
GENUINE = (RUNNER_TESTS
           + "test_the_genuine_bundle_is_lean_passes_and_its_digest_is_the_installed_one")
REVOKED = REVOKED_TESTS + "test_a_revoked_task_fails_alone_and_the_site_runner_goes_on"

MUTANTS = [
    mutant("the bundle check skipped", HOSTILE, RUNNER,
           "        check_bundle(fab)\n    except BundleRefused",
           "        pass\n    except BundleRefused"),
    mutant("another ClientApp allowed", HOSTILE, CHECK, "    if component != CLIENT_APP:",
           "    if False:"),
    mutant("foreign code allowed", HOSTILE, CHECK,
           "    if foreign:\n        raise BundleRefused(",
           "    if False:\n        raise BundleRefused("),
    mutant("changed site packages allowed", HOSTILE, CHECK,
           "    if changed:\n        raise BundleRefused(",
           "    if False:\n        raise BundleRefused("),
    mutant("every bundle refused", (HOSTILE, GENUINE), CHECK,
           "    names, shipped, project = _read_bundle(fab)\n",
           '    raise BundleRefused("refused")\n'),
    # Flower's own retry gives up on 403 (run ended); the runner adds 401 (token gone).
    mutant("an expired token's pull retried", REVOKED + "[token-expired]", RUNNER,
           "                and exc.response.status_code in TASK_REVOKED):",
           "                and False):"),
    mutant("an unacknowledged heartbeat ignored", REVOKED + "[heartbeat-refused]", RUNNER,
           "        if not acknowledged and not warned:", "        if False:"),
    mutant("a stalled download waited on",
           REVOKED_TESTS + "test_a_message_the_supernode_dropped_is_given_up_once_its_parts_"
           "stop_coming", RUNNER,
           "        elif time.monotonic() - self._progress > self._stall_s:",
           "        elif False:"),
    mutant("a non-positive stall timeout accepted",
           REVOKED_TESTS + "test_a_stall_timeout_that_is_not_positive_is_refused_by_name",
           RUNNER, "    if not args.stall_timeout > 0:", "    if False:"),
]
