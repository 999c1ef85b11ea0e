"""A Flower user's own ServerApp, with `FfaFedAvg` and the project's ClientApp: only B
and the head travel, A never changes, and the strategy's `start()` runs as Flower's."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_dplora.config import parse_run_config
from fed_dplora.lora.adapters import frozen_lora_fingerprint, trainable_arrays
from fed_dplora.lora.model import ModelRecipe, build_lora_model
from experiments.local_grid import LocalGrid, run_server_app
from strategies import FfaFedAvg, client_config, to_arrays, to_record

LABELS = ("emergency", "routine", "urgent")  # the demo's labels, sorted

# ---- a user's ServerApp, as they would write it --------------------------------------
app = ServerApp()
results = {}


@app.main()
def main(grid: Grid, context: Context) -> None:
    spec = parse_run_config(context.run_config)
    model = build_lora_model(ModelRecipe.from_spec(spec, len(LABELS)), torch.device("cpu"))
    strategy = FfaFedAvg.for_model(model, min_available_nodes=2)
    config = client_config(LABELS, noise_multiplier=1.0, seed=0, secure_noise=False)
    initial = to_record(trainable_arrays(model))
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=2,
                            train_config=config, evaluate_config=config)
    results.update(initial=initial, final=result.arrays, strategy=strategy, model=model,
                   evaluate=result.evaluate_metrics_clientapp)
# ---------------------------------------------------------------------------------------


class RecordingGrid(LocalGrid):
    """Keeps the tensor names of every message and reply that crossed the grid."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.travelled: list[set[str]] = []
        self.fingerprints: list[str] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        for message in [*messages, *replies]:
            self.travelled.extend(set(r) for r in message.content.array_records.values())
        self.fingerprints += [r.content["config"]["a-fingerprint"] for r in replies
                              if r.metadata.message_type == "train"]
        return replies


def test_a_users_server_app_trains_and_ships_only_b_and_the_head(config):
    grid = RecordingGrid(config, 2)
    run_server_app(app, config, grid)
    names = set().union(*grid.travelled)
    assert names and all(".lora_B." in n or "modules_to_save" in n for n in names)
    assert not any(".lora_A." in n for n in names)
    # Every client trained with the server's A: it never changed anywhere.
    strategy, model = results["strategy"], results["model"]
    assert grid.fingerprints and set(grid.fingerprints) == {strategy.a_fingerprint}
    assert frozen_lora_fingerprint(model) == strategy.a_fingerprint
    initial, final = to_arrays(results["initial"]), to_arrays(results["final"])
    assert sorted(final) == sorted(initial)
    assert any(not np.array_equal(final[n], initial[n]) for n in initial if ".lora_B." in n)
    assert sorted(results["evaluate"]) == [1, 2]
