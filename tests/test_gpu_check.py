"""experiments/gpu_check, the one command for a GPU machine, dry-run on CPU (tiny models,
"meta" standing in for the accelerator in the wrong-order cases)."""

from __future__ import annotations

import json

import torch

from experiments.gpu_check import correctness, write


def test_the_gpu_check_passes_its_correctness_section_on_cpu_and_writes_tables(tmp_path):
    rows = correctness(torch.device("cpu"), ("tiny-gpt2-lm",))
    assert [(r["model"], r["method"]) for r in rows] == [("tiny-gpt2-lm", "ffa"),
                                                         ("tiny-gpt2-lm", "vanilla")]
    for row in rows:
        assert row["exactness_rel_error"] < 1e-4
        assert "expected meta before Opacus wraps it" in row["moved_after_opacus_refused"]
        assert "expected meta before PEFT wraps it" in row["moved_after_peft_refused"]
        assert "optimizer does not hold" in row["stale_optimizer_refused"]
        assert row["right_order_moves_exactly_the_trainable"] and row["passed"]
    write(tmp_path, {"device_name": "cpu", "torch": torch.__version__, "date": "today",
                     "correctness": rows})
    assert json.loads((tmp_path / "gpu_check.json").read_text())["correctness"][0]["passed"]
    assert "| tiny-gpt2-lm | vanilla |" in (tmp_path / "gpu_check.md").read_text()
