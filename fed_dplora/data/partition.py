"""Split a labelled dataset across simulated clients with flwr-datasets partitioners."""

from __future__ import annotations

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from fed_dplora.config import DataSpec
from fed_dplora.data.sources import DataError, LabelledText


def partition(data: LabelledText, spec: DataSpec, partition_id: int,
              num_partitions: int, seed: int) -> LabelledText:
    """Records of one partition; every record lands in exactly one partition."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} outside 0..{num_partitions - 1}")
    partitioner = _make(spec, num_partitions, seed)
    # Seeded shuffle first: flwr-datasets' IID partitioner takes contiguous shards.
    partitioner.dataset = Dataset.from_dict(
        {"text": list(data.texts), "label": list(data.labels)}).shuffle(seed=seed)
    part = partitioner.load_partition(partition_id)
    return LabelledText(tuple(part["text"]), tuple(part["label"]))


def _make(spec: DataSpec, num_partitions: int, seed: int) -> Partitioner:
    if spec.partitioner == "dirichlet":
        return DirichletPartitioner(num_partitions, partition_by="label", alpha=spec.alpha,
                                    min_partition_size=2, self_balancing=False, seed=seed)
    return IidPartitioner(num_partitions)
