"""Length-sorted physical batches against the sampled order, on real variable-length text.

`LocalTrainer` sorts each Poisson-sampled logical batch by length before cutting it into
physical batches, so each pads to similar lengths. The logical batch's clipped sum, and
so the DP step, does not depend on the split (tests/test_train.py). The baseline keeps
the sampled order: the same trainer on the same records, with every length reported as
0 so the (stable) sort leaves the order alone. Modes alternate in repeats; the table
gives median seconds per DP-SGD step and sorted/unsorted throughput.

    python -m experiments.bench_padding [--data data/sst2-glue]   # python -m fed_dplora.data prepare sst2-glue data/sst2-glue
        [--text-column sentence] [--records 6000] [--batch 256] [--physical 32,64,128]
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time

import torch

from fed_dplora.config import parse_run_config
from fed_dplora.data.sources import LabelledText, load_local, sorted_label_names
from fed_dplora.data.tokenize import TokenizedData, tokenize
from fed_dplora.lora.adapters import trainable_arrays
from fed_dplora.lora.model import ModelRecipe, load_tokenizer
from fed_dplora.site.trainer import LocalTrainer, RoundPlan

log = logging.getLogger("fed_dplora.bench_padding")


class SampledOrder(TokenizedData):
    """The same records; every length reads 0, so batches keep the sampled order."""

    def length(self, index: int) -> int:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/sst2-glue")
    parser.add_argument("--text-column", default="sentence")
    parser.add_argument("--records", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--physical", default="32,64,128")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    spec = parse_run_config({"model.max-length": 48})
    whole = load_local(args.data, args.text_column, "label", 0).train
    rows = random.Random(0).sample(range(len(whole)), min(args.records, len(whole)))
    records = LabelledText(tuple(whole.texts[i] for i in rows),
                           tuple(whole.labels[i] for i in rows))
    labels = sorted_label_names(set(records.labels))
    data = tokenize(records, load_tokenizer(spec.model), spec.model.max_length, labels)
    unsorted = SampledOrder(data.input_ids, data.labels, data.pad_token_id)
    lengths = [len(r) for r in data.input_ids]
    log.info("%s: %d records, tokens mean %.1f / max %d; MiniLM FFA, DP-SGD batch %d, "
             "%d torch threads", args.data, len(data), statistics.mean(lengths),
             max(lengths), args.batch, torch.get_num_threads())
    trainer = LocalTrainer(ModelRecipe.from_spec(spec, len(labels)), torch.device("cpu"),
                           private=True)
    start = trainable_arrays(trainer.model)
    log.info("%-9s %14s %14s %16s", "physical", "sorted s/step", "sampled s/step",
             "sorted/sampled")
    for physical in (int(x) for x in args.physical.split(",")):
        plan = RoundPlan(args.steps, args.batch, physical, 1.0, "sgd", 0.6, 1.0, seed=1)
        trainer.train(start, plan, data)  # warm-up
        times = {"sorted": [], "sampled": []}
        for _ in range(args.repeats):
            for mode, records_in in (("sorted", data), ("sampled", unsorted)):
                began = time.perf_counter()
                trainer.train(start, plan, records_in)
                times[mode].append((time.perf_counter() - began) / args.steps)
        fast, slow = statistics.median(times["sorted"]), statistics.median(times["sampled"])
        log.info("%-9d %14.3f %14.3f %15.2fx", physical, fast, slow, slow / fast)


if __name__ == "__main__":
    main()
