"""Partitioners (flwr-datasets) on labelled text: coverage, skew, classes, natural ids."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from fed_dplora.config import DataSpec
from fed_dplora.data.partition import partition
from fed_dplora.data.sources import DataError, LabelledText

N, CLIENTS = 900, 5
DATA = LabelledText(tuple(f"text {i}" for i in range(N)), tuple(str(i % 3) for i in range(N)),
                    tuple(f"site-{i % CLIENTS}" for i in range(N)))


def parts(spec: DataSpec, data: LabelledText = DATA, clients: int = CLIENTS, seed: int = 0):
    return [partition(data, spec, k, clients, seed=seed) for k in range(clients)]


@pytest.mark.parametrize("spec", [DataSpec(partitioner="iid"),
                                  DataSpec(partitioner="dirichlet", alpha=0.3),
                                  DataSpec(partitioner="pathological", classes_per_client=1),
                                  DataSpec(partitioner="natural", partition_column="site")],
                         ids=["iid", "dirichlet", "pathological", "natural"])
def test_every_record_lands_in_exactly_one_partition(spec):
    got = [t for p in parts(spec) for t in p.texts]
    assert sorted(got) == sorted(DATA.texts)


def _skew(spec: DataSpec) -> float:
    """Mean over clients and 5 seeds of the total-variation distance between a client's
    label distribution and the uniform one of the whole dataset."""
    distances = []
    for seed in range(5):
        for p in parts(spec, seed=seed):
            counts = Counter(p.labels)
            distances.append(sum(abs(counts[c] / len(p) - 1 / 3) for c in "012") / 2)
    return sum(distances) / len(distances)


def test_dirichlet_skew_grows_as_alpha_shrinks():
    skews = [_skew(DataSpec(partitioner="dirichlet", alpha=a)) for a in (100.0, 1.0, 0.05)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.4  # near-uniform vs mostly one class


def test_pathological_gives_each_client_its_number_of_classes():
    for k in (1, 2):
        for p in parts(DataSpec(partitioner="pathological", classes_per_client=k)):
            assert 0 < len(set(p.labels)) <= k


def test_natural_partition_follows_the_column():
    spec = DataSpec(partitioner="natural", partition_column="site")
    for k, p in enumerate(parts(spec)):
        assert set(p.groups) == {f"site-{k}"}
        assert len(p) == N // CLIENTS
    with pytest.raises(DataError, match="5 values.*one SuperNode per value.*there are 4"):
        parts(spec, clients=4)
    unlabelled = dataclasses.replace(DATA, groups=tuple("x" for _ in range(N)))
    with pytest.raises(DataError, match="1 values"):
        parts(spec, unlabelled)
