"""`flwr run .` end to end: a real local SuperLink, Ray simulation, run folder, adapter.

Runs in a temporary FLWR_HOME on free ports and stops the SuperLink it started by pid.
`flwr run --stream` exits 0 even when the ServerApp fails, so the run's own status is
checked with `flwr ls`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fed_dplora.data.site import SitePlacement, load_site
from fed_dplora.data.tokenize import tokenize
from fed_dplora.lora.model import load_tokenizer
from fed_dplora.run.results import load_final_model, read_metrics
from fed_dplora.tasks import task_for
from fed_dplora.site.trainer import evaluate_model

from flwr_cli import SUPERNODES, flwr_run, run_statuses

pytestmark = pytest.mark.e2e


def test_ffa_dp_run_writes_metrics_and_a_reloadable_adapter(tiny_bert, flwr_env, tmp_path):
    out = tmp_path / "runs"
    config = (f'model.name="{tiny_bert}" output-dir="{out}" num-server-rounds=2 '
              'clients-per-round=2 local-steps=2 batch-size=32 physical-batch-size=16 '
              'data.demo-records-per-site=150 learning-rate=0.5')
    proc = flwr_run(flwr_env, config, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert run_statuses(flwr_env, tmp_path) == ["finished:completed"], proc.stdout[-3000:]
    (run_dir,) = out.iterdir()
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    for key in ("eval_loss", "eval_accuracy", "train_loss", "epsilon_sample", "delta",
                "bytes_up", "bytes_down", "clients", "aggregation_error", "wall_s"):
        assert all(r[key] is not None for r in rows), key
    assert all(r["epsilon_client"] is None for r in rows)
    assert 0 < rows[0]["epsilon_sample"] < rows[1]["epsilon_sample"] <= 8.0
    # Round 2 starts (UNIX time) after round 1 took its wall time.
    assert rows[1]["started_at"] >= rows[0]["started_at"] + rows[0]["wall_s"]
    assert all(r["aggregation_error"] < 1e-9 and len(r["clients"]) == 2 for r in rows)
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["sample"]["epsilon_rdp_max"] == pytest.approx(rows[-1]["epsilon_sample"])
    assert sorted(report["sample"]["epsilon_rdp"]) == [f"partition-{i}"
                                                        for i in range(SUPERNODES)]
    assert report["sample"]["epsilon_pld_max"] <= report["sample"]["epsilon_rdp_max"]
    # `flwr run` is a simulation: "auto" noise is seeded (reproducible), not secure, and
    # every client found itself inside Flower's simulation runtime (clients.runtime).
    assert report["secure_noise"] is False and report["lost_rounds"] == []
    assert set(report["randomness"].values()) == {"seeded"}

    # The saved adapter reproduces the final federated evaluation exactly.
    model, spec, labels = load_final_model(run_dir)
    # FFA ships exactly the trainable tensors (B and head), never A.
    shipped = sum(p.numel() * 4 for n, p in model.named_parameters()
                  if ".lora_B." in n or "modules_to_save" in n)
    assert all(r["bytes_up"] == 2 * shipped for r in rows)
    tokenizer = load_tokenizer(spec.model)
    correct = total = 0
    for site in range(SUPERNODES):
        test = load_site(spec, SitePlacement(site, SUPERNODES)).test
        report = evaluate_model(model, task_for(spec.task),
                                tokenize(test, tokenizer, spec.model.max_length, labels),
                                128, torch.device("cpu"))
        correct += report.accuracy * report.num_examples
        total += report.num_examples
    assert correct / total == pytest.approx(rows[-1]["eval_accuracy"], abs=1e-9)


def test_vanilla_reports_nonzero_aggregation_error_and_failures_are_visible(
        tiny_bert, flwr_env, tmp_path):
    out = tmp_path / "runs"
    common = (f'model.name="{tiny_bert}" output-dir="{out}" num-server-rounds=2 '
              'clients-per-round=3 local-steps=2 batch-size=32 physical-batch-size=16 '
              'data.demo-records-per-site=150 learning-rate=0.5')
    proc = flwr_run(flwr_env, common + ' method="vanilla"', tmp_path)
    assert run_statuses(flwr_env, tmp_path) == ["finished:completed"], proc.stdout[-3000:]
    (run_dir,) = out.iterdir()
    rows = read_metrics(run_dir)
    assert len(rows) == 2 and all(r["aggregation_error"] > 1e-6 for r in rows)
    model, _, _ = load_final_model(run_dir)  # vanilla ships A as well as B and head
    shipped = sum(p.numel() * 4 for n, p in model.named_parameters()
                  if ".lora_A." in n or ".lora_B." in n or "modules_to_save" in n)
    assert all(r["bytes_up"] == 3 * shipped for r in rows)

    # A bad run config fails the run; --stream still exits 0, so read the status.
    bad = flwr_run(flwr_env, common.replace("local-steps=2", "local-steps=0"), tmp_path)
    statuses = run_statuses(flwr_env, tmp_path)
    assert statuses.count("finished:failed") == 1, bad.stdout[-3000:] + bad.stderr[-2000:]
    assert "local-steps=0: must be > 0" in bad.stdout + bad.stderr
    # A misspelt key never reaches our ServerApp: Flower refuses the run itself, and
    # names the key only in the SuperLink's log (docs/deployment.md, section 7).
    misspelt = flwr_run(flwr_env, common + " privacy.epsilon=8.0", tmp_path)
    assert misspelt.returncode != 0
    assert "[code: 15] Invalid run configuration." in misspelt.stdout + misspelt.stderr
    superlink_log = Path(flwr_env["FLWR_HOME"]) / "local-superlink" / "superlink.log"
    assert "Key 'privacy.epsilon' is not present" in superlink_log.read_text()


def test_causal_lm_run_of_a_gpt2_model(tiny_gpt2_lm, flwr_env, tmp_path):
    """task="causal-lm" through the real `flwr run .`: GPT-2 (Conv1D) LoRA, DP, 2 rounds."""
    out = tmp_path / "runs"
    config = (f'task="causal-lm" model.name="{tiny_gpt2_lm}" output-dir="{out}" '
              'num-server-rounds=2 clients-per-round=2 local-steps=2 batch-size=32 '
              'physical-batch-size=16 data.demo-records-per-site=150 learning-rate=0.5 '
              'generation.max-new-tokens=4')
    proc = flwr_run(flwr_env, config, tmp_path)
    assert run_statuses(flwr_env, tmp_path) == ["finished:completed"], proc.stdout[-3000:]
    (run_dir,) = out.iterdir()
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in rows)
    assert 0 < rows[0]["epsilon_sample"] < rows[1]["epsilon_sample"] <= 8.0
    model, _, labels = load_final_model(run_dir)
    assert labels == ()
    shipped = sum(p.numel() * 4 for n, p in model.named_parameters() if ".lora_B." in n)
    assert all(r["bytes_up"] == 2 * shipped for r in rows)  # FFA: B only, no head
    samples = (run_dir / "samples.jsonl").read_text().splitlines()
    assert sorted({json.loads(s)["round"] for s in samples}) == [0, 1, 2]
