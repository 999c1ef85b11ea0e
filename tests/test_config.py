"""Run config parsing: defaults, types, choices, combinations; one clear error each."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fed_dplora.config import ConfigError, RunSpec, parse_run_config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_defaults_parse_to_the_dataclass_defaults():
    flat = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert parse_run_config(flat) == RunSpec()


def test_overrides_reach_their_sections():
    spec = parse_run_config({"method": "vanilla", "privacy.target-epsilon": 3,
                             "privacy.delta": 1e-6, "lora.target-modules": "q_proj, v_proj",
                             "data.partitioner": "dirichlet", "data.path": "x.csv"})
    assert spec.method == "vanilla" and spec.privacy.target_epsilon == 3.0
    assert spec.privacy.delta == 1e-6 and spec.lora.target_modules == ("q_proj", "v_proj")
    assert spec.data.partitioner == "dirichlet" and not spec.data.is_demo


@pytest.mark.parametrize("flat,pattern", [
    ({"privacy.epsilon": 3.0}, r"unknown run-config key.*privacy.epsilon.*privacy.target-epsilon"),
    ({"method": "fedprox"}, r"method='fedprox'.*\['ffa', 'vanilla'\]"),
    ({"local-steps": 2.5}, r"local-steps=2.5: expected int"),
    ({"local-steps": True}, r"local-steps=True: expected int"),
    ({"batch-size": 0}, r"batch-size=0: must be > 0"),
    ({"privacy.delta": 2.0}, r"privacy.delta=2.0"),
    ({"privacy.delta": "tiny"}, r"privacy.delta='tiny'.*auto"),
    ({"batch-size": 32, "physical-batch-size": 64}, r"physical-batch-size=64 exceeds"),
    ({"privacy.level": "client"}, r"privacy.level='client'.*not implemented yet"),
    ({"privacy.level": "both"}, r"privacy.level='both'.*not implemented yet"),
    ({"data.partitioner": "dirichlet"}, r"data.partitioner='dirichlet' applies to data.path"),
    ({"data.path": "a.csv", "data.name": "org/ds"}, r"both set"),
    ({"lora.target-modules": " , "}, r"lora.target-modules"),
])
def test_bad_values_name_the_key_and_what_is_valid(flat, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_run_config(flat)
