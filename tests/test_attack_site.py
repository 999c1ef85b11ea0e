"""The attacker's harness, short (`python -m experiments.attack_site` runs it in full):
an informed hostile coordinator recovers a site's labels only as far as the site's
charged epsilon allows, and recovers them where the site allows un-noised rounds."""

from __future__ import annotations

from experiments import attack_site


def test_a_hostile_coordinator_recovers_labels_only_as_far_as_the_sites_epsilon_allows(
        tmp_path):
    result = attack_site.run(["unnoised-opted-in", "one-round-sigma6", "unnoised"],
                             trials=12, out=tmp_path)
    rows = {row["strategy"]: row for row in result["rows"]}
    # The attack has power: without noise it reads the label every time.
    assert rows["unnoised-opted-in"]["recovered"] == 12
    noised = rows["one-round-sigma6"]
    assert 0 < noised["epsilon"] < 2 and noised["profile_bound"] < 0.5, noised
    assert noised["profile_bound"] <= noised["point_bound"]
    assert rows["unnoised"]["epsilon"] == 0  # declined: nothing released, nothing charged
    assert result["violations"] == [], result["rows"]
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {name} |" in table for name in rows)
