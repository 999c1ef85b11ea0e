"""Split a labelled dataset across simulated clients with flwr-datasets partitioners."""

from __future__ import annotations

from datasets import Dataset
from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner,
                                       NaturalIdPartitioner, Partitioner,
                                       PathologicalPartitioner)

from fed_dplora.config import DataSpec
from fed_dplora.data.sources import DataError, LabelledText


def partition(data: LabelledText, spec: DataSpec, partition_id: int,
              num_partitions: int, seed: int) -> LabelledText:
    """Records of one partition; every record lands in exactly one partition."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} outside 0..{num_partitions - 1}")
    partitioner = make_partitioner(spec, num_partitions, seed)
    columns = {"text": list(data.texts), "label": list(data.labels)}
    if spec.partitioner == "natural":
        values = sorted(set(data.groups))
        if len(values) != num_partitions:
            raise DataError(
                f"data.partition-column={spec.partition_column!r} has {len(values)} values "
                f"{values[:10]}; natural partitioning needs one SuperNode per value "
                f"(num-supernodes={len(values)}), there are {num_partitions}")
        # Partition k is the k-th value in sorted order, the same in every split.
        columns["group"] = [values.index(g) for g in data.groups]
    # Seeded shuffle first: flwr-datasets' IID partitioner takes contiguous shards.
    partitioner.dataset = Dataset.from_dict(columns).shuffle(seed=seed)
    part = partitioner.load_partition(partition_id)
    return LabelledText(tuple(part["text"]), tuple(part["label"]),
                        tuple(str(values[g]) for g in part["group"])
                        if spec.partitioner == "natural" else ())


def make_partitioner(spec: DataSpec, num_partitions: int, seed: int) -> Partitioner:
    """The flwr-datasets partitioner `data.partitioner` names (natural: by "group")."""
    if spec.partitioner == "dirichlet":
        return DirichletPartitioner(num_partitions, partition_by="label", alpha=spec.alpha,
                                    min_partition_size=2, self_balancing=False, seed=seed)
    if spec.partitioner == "pathological":
        return PathologicalPartitioner(num_partitions, partition_by="label",
                                       num_classes_per_partition=spec.classes_per_client,
                                       class_assignment_mode="first-deterministic",
                                       seed=seed)
    if spec.partitioner == "natural":
        return NaturalIdPartitioner(partition_by="group")
    return IidPartitioner(num_partitions)
