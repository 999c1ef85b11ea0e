"""The project's mutants: for each privacy or security guarantee, the patches that remove
or weaken its fix and the tests that must then fail (`python -m tests.mutants`).

A test added for a privacy or security guarantee registers its mutant in its group's
module here; `tests/test_mutants.py` checks that every test of the guarded test files is
named by one, and runs the groups CI runs."""

from . import (attack, coordinator, hostile_site, ledger, secrecy, site_limits,
               site_rule, site_runner)
from .mutant import Mutant

GROUPS: dict[str, list[Mutant]] = {
    "site-rule": site_rule.MUTANTS,
    "site-limits": site_limits.MUTANTS,
    "secrecy": secrecy.MUTANTS,
    "coordinator": coordinator.MUTANTS,
    "ledger": ledger.MUTANTS,
    "site-runner": site_runner.MUTANTS,
    "hostile-site": hostile_site.MUTANTS,
    "attack": attack.MUTANTS,
}
