"""A dataset by name (a hub id, or a local dataset folder `datasets` can read) through
flwr-datasets' `FederatedDataset`, partitioned with the project's partitioners.

The train split is `data.train-split`; the test split `data.test-split`, where "auto"
takes the first labelled of "test" and "validation" (GLUE hides its test labels as -1).
Each split is shuffled with the run seed, capped at `data.max-records` (a seeded random
N), its columns renamed to text / label (ClassLabel ids become their names), and then
partitioned: every site gets its share of both splits.
"""

from __future__ import annotations

from datasets import ClassLabel, Dataset, DatasetDict

from fed_dplora.config import RunSpec
from fed_dplora.data.partition import make_partitioner
from fed_dplora.data.sources import DataError, LabelledText, Splits

AUTO_TEST_SPLITS = ("test", "validation")
HIDDEN = -1  # a label GLUE-style datasets publish in place of the real one


def load_hub_site(spec: RunSpec, partition_id: int, num_partitions: int,
                  text_column: str, label_column: str) -> Splits:
    """Site `partition_id`'s train and test records of dataset `data.name`."""
    from flwr_datasets import FederatedDataset  # ~1.5 s: only where a hub set is used

    data = spec.data
    federated = FederatedDataset(
        dataset=data.name, subset=data.subset or None, shuffle=True, seed=spec.seed,
        preprocessor=lambda loaded: _prepared(loaded, spec, num_partitions, text_column,
                                              label_column),
        partitioners={s: make_partitioner(data, num_partitions, spec.seed)
                      for s in ("train", "test")})
    try:
        parts = [federated.load_partition(partition_id, s) for s in ("train", "test")]
    except DataError:
        raise
    except Exception as err:  # the hub and datasets raise many types: say which key
        raise DataError(f"data.name={data.name!r} (data.subset={data.subset!r}): cannot "
                        f"load it ({err}); offline, use a local dataset folder, or "
                        "data.path with local files") from err
    return Splits(*(LabelledText(tuple(p["text"]), tuple(p["label"]),
                                 tuple(p["group"]) if "group" in p.column_names else ())
                    for p in parts))


def _prepared(loaded: DatasetDict, spec: RunSpec, num_partitions: int, text_column: str,
              label_column: str) -> DatasetDict:
    """{"train", "test"}: the chosen splits, capped and renamed."""
    train, test = spec.data.train_split, _test_split(spec, loaded, label_column)
    for split in (train, test):
        if split not in loaded:
            raise DataError(f"data.name={spec.data.name!r} has splits {list(loaded)}, not "
                            f"{split!r}: set data.train-split / data.test-split")
    prepared = DatasetDict({name: _renamed(loaded[split], spec, text_column, label_column)
                            for name, split in (("train", train), ("test", test))})
    if spec.data.partitioner == "natural":
        _check_groups(prepared, spec.data.partition_column, num_partitions)
    return prepared


def _check_groups(prepared: DatasetDict, column: str, num_partitions: int) -> None:
    """Natural partitioning: one SuperNode per value, the same values in both splits."""
    values = {name: sorted(split.unique("group")) for name, split in prepared.items()}
    if values["train"] != values["test"] or len(values["train"]) != num_partitions:
        raise DataError(
            f"data.partition-column={column!r} has {len(values['train'])} values in the "
            f"train split and {len(values['test'])} in the test split "
            f"({values['train'][:10]}); natural partitioning needs the same values in both "
            f"and one SuperNode per value (num-supernodes), there are {num_partitions}")


def _test_split(spec: RunSpec, dataset: DatasetDict, label_column: str) -> str:
    """`data.test-split`, or "auto": the first labelled of test / validation."""
    wanted = spec.data.test_split
    candidates = AUTO_TEST_SPLITS if wanted == "auto" else (wanted,)
    for split in candidates:
        if split in dataset and not (label_column and _hidden(dataset[split], label_column)):
            return split
    if wanted != "auto" and wanted in dataset:
        raise DataError(f"data.test-split={wanted!r} of {spec.data.name!r} hides its labels "
                        f"(every {label_column!r} is {HIDDEN}); choose a labelled split of "
                        f"{list(dataset)}, e.g. \"validation\"")
    raise DataError(f"data.name={spec.data.name!r} has no labelled test split among "
                    f"{list(dataset)}: set data.test-split")


def _hidden(split, label_column: str) -> bool:
    return label_column in split.column_names and set(split.unique(label_column)) == {HIDDEN}


def _renamed(split, spec: RunSpec, text_column: str, label_column: str) -> Dataset:
    """Capped, with columns text / label (names, not ids) / group (natural)."""
    data = spec.data
    wanted = [c for c in (text_column, label_column, data.partition_column) if c]
    missing = [c for c in wanted if c not in split.column_names]
    if missing:
        raise DataError(f"data.name={data.name!r}: no column(s) {missing}; columns are "
                        f"{split.column_names} (set data.text-column / data.label-column "
                        "/ data.partition-column)")
    if data.max_records:
        split = split.select(range(min(data.max_records, len(split))))
    feature = split.features.get(label_column)
    columns = {"text": [str(t) for t in split[text_column]],
               "label": ([_label(v, feature) for v in split[label_column]] if label_column
                         else [""] * len(split))}
    if data.partition_column:
        columns["group"] = [str(g) for g in split[data.partition_column]]
    return Dataset.from_dict(columns)


def _label(value, feature) -> str:
    return feature.int2str(value) if isinstance(feature, ClassLabel) else str(value).strip()
