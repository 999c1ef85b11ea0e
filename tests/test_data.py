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
