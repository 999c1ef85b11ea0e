"""Aggregation methods are plug-ins: a module and a registration line, refused by name
when unknown, with their own run-config defaults."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from fed_dplora.config import ConfigError, LoraSpec, ModelSpec, parse_run_config
from fed_dplora.config.methods import METHODS, MethodEntry
from fed_dplora.lora.adapters import trainable_arrays
from fed_dplora.lora.model import ModelRecipe, build_lora_model
from fed_dplora.methods import method_for
from fed_dplora.methods.base import LoraMethod


def test_an_unknown_method_is_refused_by_name_with_the_registered_ones():
    with pytest.raises(ConfigError, match=r"method='lora-xs': valid values are \['fedsa', "
                                          r"'ffa', 'frozen-ab-r', 'rolora', 'vanilla'\]"):
        parse_run_config({"method": "lora-xs"})


def test_learning_rate_auto_is_the_methods_own_default_and_a_number_wins():
    assert parse_run_config({"learning-rate": "auto"}).train.learning_rate == 1.0  # FFA
    vanilla = parse_run_config({"method": "vanilla", "learning-rate": "auto"})
    assert vanilla.train.learning_rate == METHODS["vanilla"].learning_rate == 0.1
    assert parse_run_config({"method": "vanilla"}).train.learning_rate == 0.1
    assert parse_run_config({"method": "vanilla", "learning-rate": 0.3}
                            ).train.learning_rate == 0.3
    with pytest.raises(ConfigError, match="learning-rate='fast'"):
        parse_run_config({"learning-rate": "fast"})


def test_a_new_method_is_one_module_and_one_registration_line(tiny_bert, monkeypatch):
    module = types.ModuleType("toy_method")
    module.METHOD = LoraMethod("frozen-b", a_trains=True, shared_a=False)
    monkeypatch.setitem(sys.modules, "toy_method", module)
    monkeypatch.setitem(METHODS, "frozen-b", MethodEntry("toy_method", learning_rate=0.2))
    spec = parse_run_config({"method": "frozen-b", "model.name": tiny_bert})
    assert spec.train.learning_rate == 0.2 and method_for("frozen-b") is module.METHOD
    model = build_lora_model(ModelRecipe(ModelSpec(tiny_bert), LoraSpec(), "frozen-b", 3, 0),
                             torch.device("cpu"))
    assert any(".lora_A." in name for name in trainable_arrays(model))


@pytest.mark.parametrize("name, a_trains, shared_a", [("ffa", False, True),
                                                      ("vanilla", True, False)])
def test_the_two_methods_say_what_trains_and_what_the_server_checks(name, a_trains,
                                                                   shared_a):
    method = method_for(name)
    assert (method.name, method.a_trains, method.shared_a) == (name, a_trains, shared_a)
