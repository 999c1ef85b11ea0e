"""One client's train/test records, from the run's data spec and where the client sits."""

from __future__ import annotations

from dataclasses import dataclass

from fed_dplora.config import RunSpec
from fed_dplora.data.demo import generate_site
from fed_dplora.data.sources import (TEST_FRACTION, LabelledText, Splits, load_hub,
                                     load_local, split)
from fed_dplora.tasks import uses_labels


# Sites whose data one simulation worker keeps (raw and tokenized) across rounds: above
# the number of simulated sites, every worker loads each site once (evaluation visits
# every site each round; experiments/bench_scale.py measures 100 sites).
SITES_CACHED = 256


@dataclass(frozen=True)
class SitePlacement:
    """Simulation: this client's partition. Deployment: its own data path, all of it."""

    partition_id: int = 0
    num_partitions: int = 1
    data_path: str = ""  # a site's own file or folder (node config `data-path`)


def load_site(spec: RunSpec, placement: SitePlacement) -> Splits:
    """This site's train and test records, and its validation split if the run asks for
    one (held out from its training records, seeded: the same on every run)."""
    splits = _train_and_test(spec, placement)
    if not spec.data.validation_fraction:
        return splits
    held_out = split(splits.train, spec.data.validation_fraction, spec.seed + 1)
    return Splits(held_out.train, splits.test, held_out.test)


def _train_and_test(spec: RunSpec, placement: SitePlacement) -> Splits:
    data = spec.data
    # A text-only task reads no label column (every record gets the label "").
    label_column = data.label_column if uses_labels(spec.task) else ""
    if placement.data_path:
        return load_local(placement.data_path, data.text_column, label_column, spec.seed,
                          max_records=data.max_records)
    if data.is_demo:
        texts, labels = generate_site(placement.partition_id, data.demo_records_per_site,
                                      spec.seed)
        return split(LabelledText(tuple(texts), tuple(labels)), TEST_FRACTION, spec.seed)
    if data.path:
        whole = load_local(data.path, data.text_column, label_column, spec.seed,
                           data.partition_column, data.max_records)
    else:
        whole = load_hub(data.name, data.text_column, label_column)
    # Here only: flwr-datasets (with datasets, scipy, seaborn) takes ~1.5 s to import,
    # which a site with its own data or the demo task should not pay at start-up.
    from fed_dplora.data.partition import partition

    return Splits(*(partition(part, data, placement.partition_id, placement.num_partitions,
                              spec.seed) for part in (whole.train, whole.test)))
