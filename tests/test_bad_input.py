"""Bad input a new user or a hospital can give: each is one clear error, before any
training, naming the key or file and what would be valid (docs/deployment.md lists
them). Certificates and unknown SuperNode keys: tests/test_deployment.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

import server.census
from experiments.local_grid import LocalGrid, run_federation
from fed_dplora.run.checkpoint import CHECKPOINT_FILE
from fed_dplora.config import parse_run_config

NODES = 3
ROWS = "\n".join(f"note {i} chest pain,{'urgent' if i % 2 else 'routine'}" for i in range(200))


def data_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def folder_with_unseen_test_label(tmp_path: Path) -> str:
    folder = tmp_path / "split"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label\n" + ROWS)
    (folder / "test.csv").write_text("text,label\nnote x,emergency\nnote y,urgent\n")
    return str(folder)


# name -> (run-config changes given tmp_path, the message's fragment)
CASES = {
    "unknown key": (lambda t: {"privacy.epsilon": 8.0},
                    "unknown run-config key(s) ['privacy.epsilon']"),
    "wrong type": (lambda t: {"local-steps": "ten"}, "local-steps='ten': expected int"),
    "epsilon <= 0": (lambda t: {"privacy.target-epsilon": 0.0},
                     "privacy.target-epsilon=0.0: must be > 0"),
    "delta >= 1/n": (lambda t: {"privacy.delta": 0.01},
                     "privacy.delta=0.01 is not below 1/n"),
    "rank <= 0": (lambda t: {"lora.rank": 0}, "lora.rank=0: must be > 0"),
    "min-replies above clients-per-round": (lambda t: {"min-replies": 5},
                                            "min-replies=5 exceeds clients-per-round=2"),
    "target module not in the model": (lambda t: {"lora.target-modules": "q_proj"},
                                       "lora.target-modules='q_proj' does not fit"),
    "clients-per-round above the sites": (lambda t: {"clients-per-round": 5},
                                          "clients-per-round=5 but only 3 SuperNode(s)"),
    "missing data file": (lambda t: {"data.path": str(t / "nope.csv")},
                          "nope.csv': no such file or folder"),
    "empty data file": (lambda t: {"data.path": data_file(t, "empty.csv", "")},
                        "empty.csv: cannot parse as csv"),
    "header only": (lambda t: {"data.path": data_file(t, "header.csv", "text,label\n")},
                    "header.csv: no records"),
    "missing text column": (
        lambda t: {"data.path": data_file(t, "body.csv", "body,label\n" + ROWS)},
        "lacks data.text-column='text'"),
    "missing label column": (
        lambda t: {"data.path": data_file(t, "tag.csv", "text,tag\n" + ROWS)},
        "or data.label-column='label'"),
    "test labels never trained on": (
        lambda t: {"data.path": folder_with_unseen_test_label(t)},
        "label(s) ['emergency'] occur only in test splits"),
    "a site smaller than the batch": (
        lambda t: {"batch-size": 512, "physical-batch-size": 64},
        "hold fewer training records than batch-size=512"),
    "unknown model offline": (lambda t: {"model.name": "no-such-org/no-such-model"},
                              "model.name='no-such-org/no-such-model': cannot load"),
    "output folder not writable": (lambda t: {"output-dir": "/proc/fed-dplora-runs"},
                                   "output-dir='/proc/fed-dplora-runs': cannot create"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_clear_error_before_training(config, tmp_path, monkeypatch,
                                                      caplog, name):
    changes, fragment = CASES[name]
    monkeypatch.setattr(server.census, "NODE_WAIT_S", 1)
    # Offline as this machine is, without 5 retries a hub lookup (23 s each).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config.update(changes(tmp_path))
    with pytest.raises(Exception) as raised:
        run_federation(config, NODES)
    assert fragment in str(raised.value)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert fragment in errors[0]  # the first ERROR line, before Flower's traceback
    assert not list(Path(config["output-dir"]).glob("*/metrics.jsonl"))  # nothing trained


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_at_the_census(config):
    with pytest.raises(Exception, match='device="cuda" but torch sees no CUDA device'):
        run_federation({**config, "device": "cuda"}, NODES)


def test_a_changed_config_or_a_damaged_checkpoint_cannot_resume(config):
    run_federation(config, NODES)
    with pytest.raises(ValueError, match=r"differs .* \['num_server_rounds'\]"):
        run_federation({**config, "resume": True, "num-server-rounds": 4}, NODES)
    checkpoint = Path(config["output-dir"]) / "run" / CHECKPOINT_FILE
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="checkpoint.npz is damaged"):
        run_federation({**config, "resume": True}, NODES)


def test_a_site_whose_data_path_is_missing_is_left_out_with_its_reason(config, tmp_path,
                                                                      caplog):
    nodes = [{"partition-id": i, "num-partitions": NODES} for i in range(NODES)]
    nodes[2]["data-path"] = str(tmp_path / "not-mounted" / "notes.csv")
    run_federation(config, NODES, LocalGrid(config, NODES, nodes))
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "census: node 102 is left out of this run" in warnings
    assert "not-mounted/notes.csv" in warnings
    assert (Path(config["output-dir"]) / "run" / "summary.json").exists()


def test_resuming_a_run_that_never_trained_checks_its_sites_like_a_new_run(config):
    resumed = {**config, "resume": True, "batch-size": 512, "physical-batch-size": 64}
    folder = Path(config["output-dir"]) / "run"
    folder.mkdir(parents=True)  # a run folder created, then a crash before round 1
    (folder / "config.json").write_text(json.dumps(parse_run_config(resumed).to_dict()))
    with pytest.raises(Exception, match="hold fewer training records than batch-size=512"):
        run_federation(resumed, NODES)
