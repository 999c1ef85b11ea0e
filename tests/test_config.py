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


def test_privacy_levels_and_client_level_keys():
    spec = parse_run_config({"privacy.level": "both", "privacy.client-sampling": "poisson",
                             "privacy.client-noise-multiplier": 1.1,
                             "privacy.client-clip-norm": 0.3, "privacy.secure-noise": True,
                             "privacy.noise-multiplier": "auto"})
    privacy = spec.privacy
    assert privacy.sample_level and privacy.client_level and privacy.enabled
    assert privacy.client_sampling == "poisson" and privacy.client_noise_multiplier == 1.1
    assert privacy.client_clip_norm == 0.3 and privacy.secure_noise is True
    assert privacy.noise_multiplier is None
    client = parse_run_config({"privacy.level": "client"}).privacy
    assert client.client_level and not client.sample_level
    assert parse_run_config({}).privacy.secure_noise is None  # auto


@pytest.mark.parametrize("flat,pattern", [
    ({"privacy.epsilon": 3.0}, r"unknown run-config key.*privacy.epsilon.*privacy.target-epsilon"),
    ({"method": "fedprox"}, r"method='fedprox'.*\['fedsa', 'ffa', 'frozen-ab-r', 'rolora', 'vanilla'\]"),
    # a renamed method: the new name, and why (LoRA-SB's initialisation is not here)
    ({"method": "fed-sb"}, r"method='fed-sb' is now method='frozen-ab-r'.*LoRA-SB"),
    ({"local-steps": 2.5}, r"local-steps=2.5: expected int"),
    ({"local-steps": True}, r"local-steps=True: expected int"),
    ({"batch-size": 0}, r"batch-size=0: must be > 0"),
    ({"privacy.delta": 2.0}, r"privacy.delta=2.0"),
    ({"privacy.delta": "tiny"}, r"privacy.delta='tiny'.*auto"),
    ({"batch-size": 32, "physical-batch-size": 64}, r"physical-batch-size=64 exceeds"),
    ({"privacy.level": "all"}, r"privacy.level='all'.*\['none', 'sample', 'client', 'both'\]"),
    ({"privacy.client-sampling": "random"}, r"client-sampling='random'.*\['fixed', 'poisson'\]"),
    ({"privacy.secure-noise": "yes"}, r"secure-noise='yes'.*true, false or \"auto\""),
    ({"privacy.noise-multiplier": -1.0}, r"noise-multiplier=-1.0: must be a number > 0"),
    ({"privacy.client-delta": 1.5}, r"client-delta=1.5.*\(0, 1\)"),
    ({"privacy.client-clip-norm": 0.0}, r"client-clip-norm=0.0: must be > 0"),
    ({"resume": True}, r"resume=true needs run-name"),
    ({"run-name": "../elsewhere"}, r"run-name='../elsewhere'.*without path separators"),
    ({"data.partitioner": "dirichlet"}, r"data.partitioner='dirichlet' applies to data.path"),
    ({"data.path": "a.csv", "data.name": "org/ds"}, r"both set"),
    ({"lora.target-modules": " , "}, r"lora.target-modules"),
])
def test_bad_values_name_the_key_and_what_is_valid(flat, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_run_config(flat)


def test_partitioner_keys():
    spec = parse_run_config({"data.path": "x.csv", "data.partitioner": "pathological",
                             "data.classes-per-client": 2})
    assert spec.data.classes_per_client == 2
    natural = parse_run_config({"data.path": "x.csv", "data.partitioner": "natural",
                                "data.partition-column": "hospital"})
    assert natural.data.partition_column == "hospital"
    with pytest.raises(ConfigError, match="partition-column go together"):
        parse_run_config({"data.path": "x.csv", "data.partitioner": "natural"})
    with pytest.raises(ConfigError, match="classes-per-client=0: must be > 0"):
        parse_run_config({"data.path": "x.csv", "data.classes-per-client": 0})
