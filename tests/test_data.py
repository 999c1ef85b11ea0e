"""Loading local files (real SST-2 / AG News), the demo task, partitioning, tokenizing."""

from __future__ import annotations

from collections import Counter

import pytest

from fed_dplora.config import ConfigError, DataSpec, RunSpec, parse_run_config
from fed_dplora.data.demo import LABELS, generate_site
from fed_dplora.data.partition import partition
from fed_dplora.data.site import SitePlacement, load_site
from fed_dplora.data.sources import DataError, LabelledText, load_local, sorted_label_names
from conftest import SHARED_DATA

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(),
                                  reason="../shared/data (real datasets) not beside the repo")


@needs_shared
def test_sst2_folder_headerless_tsv_with_integer_labels():
    splits = load_local(SHARED_DATA / "sst2", "text", "label", 0)
    assert (len(splits.train), len(splits.test)) == (6920, 1821)
    assert set(splits.train.labels) == {"0", "1"}
    assert splits.train.texts[0].startswith("a stirring , funny")


@needs_shared
def test_agnews_file_with_string_labels_and_bare_quotes():
    splits = load_local(SHARED_DATA / "agnews" / "dev.tsv", "text", "label", 0)
    assert len(splits.train) + len(splits.test) == 10001  # the file's record count
    assert sorted_label_names(set(splits.train.labels)) == (
        "Business", "Sci/Tech", "Sports", "World")
    assert any('"' in t for t in splits.train.texts)


@needs_shared
def test_glue_sst2_header_with_configured_text_column():
    splits = load_local(SHARED_DATA / "sst2-glue", "sentence", "label", 0)
    assert (len(splits.train), len(splits.test)) == (60614, 872)
    assert set(splits.train.labels) == set(splits.test.labels) == {"0", "1"}
    with pytest.raises(DataError, match="looks like a header.*'sentence'"):
        load_local(SHARED_DATA / "sst2-glue", "text", "label", 0)


def test_formats_and_clear_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"note": "x y", "y": "pos"}\n{"note": "z", "y": "neg"}\n')
    data = load_local(tmp_path / "a.jsonl", "note", "y", 0)
    assert sorted(data.train.labels + data.test.labels) == ["neg", "pos"]
    with pytest.raises(DataError, match="no column.*'text'.*note"):
        load_local(tmp_path / "a.jsonl", "text", "y", 0)
    (tmp_path / "b.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DataError, match="b.csv.*data.text-column"):
        load_local(tmp_path / "b.csv", "text", "label", 0)
    # A header naming only one of the configured columns is a header, not a record.
    (tmp_path / "d.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    with pytest.raises(DataError, match="d.tsv.*looks like a header.*data.text-column"):
        load_local(tmp_path / "d.tsv", "text", "label", 0)
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported suffix"):
        load_local(tmp_path / "c.txt", "text", "label", 0)
    with pytest.raises(DataError, match="no such file"):
        load_local(tmp_path / "missing.csv", "text", "label", 0)
    with pytest.raises(DataError, match="train"):
        load_local(tmp_path, "text", "label", 0)


def test_demo_is_deterministic_skewed_per_site_and_synthetic():
    texts, labels = generate_site(0, 600, seed=0)
    assert (texts, labels) == generate_site(0, 600, seed=0)
    assert set(labels) == set(LABELS)
    mixes = [Counter(generate_site(s, 600, 0)[1]).most_common(1)[0][0] for s in range(3)]
    assert len(set(mixes)) == 3  # each site has a different majority class
    assert "SOB" in " ".join(generate_site(1, 600, 0)[0]) or "c/o" in generate_site(1, 5, 0)[0][0]


def test_partitions_cover_the_data_and_dirichlet_skews_more_with_small_alpha():
    texts, labels = generate_site(0, 900, 0)
    data = LabelledText(tuple(texts), tuple(labels))

    def skew(alpha):
        parts = [partition(data, DataSpec(partitioner="dirichlet", alpha=alpha), i, 3, 0)
                 for i in range(3)]
        assert sum(len(p) for p in parts) == len(data)
        return sum(max(Counter(p.labels).values()) / len(p) for p in parts) / 3

    iid = [partition(data, DataSpec(), i, 3, 0) for i in range(3)]
    assert sorted(sum((list(p.texts) for p in iid), [])) == sorted(texts)
    assert skew(0.1) > skew(100.0)


def test_site_placement_uses_a_node_data_path_whole(tmp_path):
    (tmp_path / "site.csv").write_text("text,label\n" + "".join(
        f"note {i},{'a' if i % 2 else 'b'}\n" for i in range(50)))
    splits = load_site(RunSpec(), SitePlacement(data_path=str(tmp_path / "site.csv")))
    assert len(splits.train) + len(splits.test) == 50


def test_max_records_reads_only_the_first_rows_of_each_file(tmp_path):
    data = tmp_path / "data.tsv"
    data.write_text("".join(f"text number {i}\t{i % 2}\n" for i in range(50)))
    splits = load_local(data, "text", "label", seed=0, max_records=20)
    assert sorted(splits.train.texts + splits.test.texts) == sorted(
        f"text number {i}" for i in range(20))
    with pytest.raises(ConfigError, match="must be >= 0"):
        parse_run_config({"data.max-records": -1})


def test_prepare_checks_every_file_against_its_pinned_sha256(tmp_path, monkeypatch):
    """A good copy is written and its sums returned; a copy with one byte changed is
    refused and leaves nothing behind."""
    import hashlib

    from fed_dplora.data import public
    files = {"train.tsv": b"a good film\t1\n", "test.tsv": b"a dull film\t0\n"}
    monkeypatch.setitem(public.PUBLIC, "toy", tuple(
        public.PublicFile(name, ("o/r", "0" * 40), name, hashlib.sha256(data).hexdigest())
        for name, data in files.items()))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, data in files.items():
        (mirror / name).write_bytes(data)
    sums = public.prepare("toy", tmp_path / "out", mirror)
    assert sums == {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    assert (tmp_path / "out" / "train.tsv").read_bytes() == files["train.tsv"]
    (mirror / "test.tsv").write_bytes(b"a dull film\t1\n")  # a flipped label
    with pytest.raises(DataError, match="test.tsv.*SHA-256.*not the copy the studies used"):
        public.prepare("toy", tmp_path / "tampered", mirror)
    assert not (tmp_path / "tampered" / "test.tsv").exists()


def test_the_studies_data_is_pinned_to_commits():
    from fed_dplora.data.public import PUBLIC
    for name, files in PUBLIC.items():
        for file in files:
            assert len(file.source[1]) == 40 and len(file.sha256) == 64, (name, file)
            assert file.url.startswith("https://raw.githubusercontent.com/")


@needs_shared
def test_this_workspaces_offline_copy_is_the_pinned_one(tmp_path):
    from fed_dplora.data.public import PUBLIC, prepare
    for name in PUBLIC:
        prepare(name, tmp_path / name, SHARED_DATA / name)


def dataset_folder(tmp_path, hidden_test: bool = True):
    """A local dataset folder as `datasets` reads one: train / validation / test CSVs,
    the test split's labels hidden (-1) as GLUE publishes them."""
    import csv
    folder = tmp_path / "toy-dataset"
    folder.mkdir()
    texts, labels = generate_site(0, 400, 0)
    sites = ["north", "south"]
    for split, lo, hi in (("train", 0, 240), ("validation", 240, 320), ("test", 320, 400)):
        with (folder / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence", "label", "site"])
            for i in range(lo, hi):
                hidden = split == "test" and hidden_test
                writer.writerow([texts[i], -1 if hidden else LABELS.index(labels[i]),
                                 sites[i % 2]])
    return folder


def hub_spec(folder, **extra) -> RunSpec:
    return parse_run_config({"data.name": str(folder), "data.text-column": "sentence",
                             **extra})


def test_a_dataset_by_name_loads_through_federated_dataset_with_a_labelled_test_split(
        tmp_path):
    folder = dataset_folder(tmp_path)
    sites = [load_site(hub_spec(folder), SitePlacement(i, 2)) for i in range(2)]
    assert sum(len(s.train) for s in sites) == 240  # every record in one partition
    assert sum(len(s.test) for s in sites) == 80  # "auto": validation (test is hidden)
    assert set(sites[0].train.labels) <= {"0", "1", "2"} and "-1" not in sites[0].test.labels
    capped = load_site(hub_spec(folder, **{"data.max-records": 100}), SitePlacement(0, 2))
    assert len(capped.train) == 50 and len(capped.test) == 40  # 100 train, 80 validation
    with pytest.raises(DataError, match="data.test-split='test'.*hides its labels"):
        load_site(hub_spec(folder, **{"data.test-split": "test"}), SitePlacement(0, 2))
    with pytest.raises(DataError, match="not 'dev'"):
        load_site(hub_spec(folder, **{"data.train-split": "dev"}), SitePlacement(0, 2))


def test_natural_partitioning_of_a_dataset_by_name_gives_each_site_its_own_records(
        tmp_path):
    folder = dataset_folder(tmp_path)
    spec = hub_spec(folder, **{"data.partitioner": "natural",
                               "data.partition-column": "site"})
    north, south = (load_site(spec, SitePlacement(i, 2)) for i in range(2))
    assert set(north.train.groups) == {"north"} and set(south.train.groups) == {"south"}
    assert set(north.test.groups) == {"north"}
    with pytest.raises(DataError, match="one SuperNode per value"):
        load_site(spec, SitePlacement(0, 3))


def test_a_federation_runs_on_a_dataset_by_name(config, tmp_path):
    from experiments.local_grid import run_federation
    from fed_dplora.run.results import read_metrics
    config.update({"data.name": str(dataset_folder(tmp_path)),
                   "data.text-column": "sentence", "num-server-rounds": 1})
    run_federation(config, 2)
    (row,) = read_metrics(tmp_path / "runs" / "run")
    assert row["eval_accuracy"] is not None and row["replies"] == 2
