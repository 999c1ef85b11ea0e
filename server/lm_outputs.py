"""What a causal-lm run adds to each round: perplexity, and greedy samples to read.

The samples come from the server's copy of the global adapter: post-processing of what
the federation already released, so they cost no privacy.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from fed_dplora.config import RunSpec
from fed_dplora.lora.adapters import load_trainable_arrays
from fed_dplora.lora.model import load_tokenizer
from fed_dplora.run.results import RunFolder
from fed_dplora.tasks.causal_lm import greedy_continuations

log = logging.getLogger("fed_dplora.server")
SAMPLES = "samples.jsonl"


class LmOutputs:
    """Per round: `eval_perplexity` for the metrics row, continuations in samples.jsonl."""

    def __init__(self, spec: RunSpec, run: RunFolder, model: torch.nn.Module) -> None:
        self.generation = spec.generation
        self.run, self.model = run, model
        self.tokenizer = load_tokenizer(spec.model)

    @classmethod
    def for_run(cls, spec: RunSpec, run: RunFolder, model: torch.nn.Module
                ) -> "LmOutputs | None":
        return cls(spec, run, model) if spec.task == "causal-lm" else None

    @staticmethod
    def row_fields(eval_loss: float | None) -> dict[str, float | None]:
        """Perplexity of the token-weighted mean loss over every site's test split."""
        return {"eval_perplexity": None if eval_loss is None else math.exp(eval_loss)}

    def write_samples(self, rnd: int, arrays: dict[str, np.ndarray]) -> None:
        """Greedy continuations of the prompts under `arrays` (round 0: before training)."""
        load_trainable_arrays(self.model, arrays, set(arrays))
        texts = greedy_continuations(self.model, self.tokenizer, self.generation.prompts,
                                     self.generation.max_new_tokens)
        for prompt, text in zip(self.generation.prompts, texts):
            self.run.append_jsonl(SAMPLES, {"round": rnd, "prompt": prompt,
                                            "continuation": text})
        log.info("round %d sample: %s|%s", rnd, self.generation.prompts[0], texts[0])
