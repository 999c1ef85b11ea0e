"""The attacker's harness (tests/test_attack_site.py): what a hostile coordinator
recovers stays under the bound of the epsilon the site charged."""

from .mutant import mutant

ATTACK = ("test_attack_site.py::test_a_hostile_coordinator_recovers_labels_only_as_far_"
          "as_the_sites_epsilon_allows")
ENGINE = "fed_dplora/dp/engine.py"
NOISE = "        std = self.config.noise_multiplier * self.config.max_grad_norm\n"

HARNESS = "experiments/attack_site.py"
GUESS = "        return int(np.argmin(distances))\n"

MUTANTS = [
    mutant("the site's noise a hundredth of what it charges for", ATTACK, ENGINE, NOISE,
           NOISE.replace("std = ", "std = 0.01 * ")),
    mutant("the adversary guesses without reading the releases", ATTACK, HARNESS, GUESS,
           "        return self.rng.randrange(K)\n"),
]
