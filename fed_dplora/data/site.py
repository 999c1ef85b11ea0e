"""One client's train/test records, from the run's data spec and where the client sits;
the identity of the data source its ledger account charges; the labels it may share."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fed_dplora.config import RunSpec
from fed_dplora.data.demo import generate_site
from fed_dplora.data.sources import (SUFFIXES, TEST_FRACTION, DataError, LabelledText,
                                     Splits, load_local, sorted_label_names, split)
from fed_dplora.refusals import PublicRefusal
from fed_dplora.tasks import uses_labels


# Sites whose data one simulation worker keeps (raw and tokenized) across rounds: above
# the number of simulated sites, every worker loads each site once, so sampled training
# and evaluation never reload one (a demo site of 300 records keeps about 0.3 MB:
# 2,048 sites about 0.6 GB a worker at most; experiments/bench_scale.py, 1,000 sites).
SITES_CACHED = 2048
# Label values leave a site (census) only when they look like labels: at most this many
# distinct values, none longer than this many characters.
MAX_SHARED_LABELS = 100
MAX_LABEL_CHARS = 40


class LabelsWithheld(DataError):
    """The label column does not look like labels, or holds values the site did not
    declare: the site declines to send them (the message never quotes a value)."""


class SplitTooSmall(PublicRefusal):
    """A deployed site's own split leaves fewer records than its minimum in a split
    (sizes follow from its node config and its published n alone)."""


@dataclass(frozen=True)
class OwnSplit:
    """A deployed site's split of its records, from its node config alone: the run
    config's `seed`, `data.max-records` and `data.validation-fraction` never change which
    records train or evaluate there, so no run can isolate a chosen record."""

    seed: int | None = None  # `split-seed`; None: from the data's SHA-256 (one split per source)
    max_records: int = 0  # `max-records`: the first that many rows of each file (0: all)
    validation_fraction: float = 0.0  # `validation-fraction`: held out from training
    min_train_records: int = 50  # `min-train-records`
    min_eval_records: int = 20  # `min-eval-records`: each of the test and validation splits

    def check_sizes(self, splits: Splits) -> None:
        """`SplitTooSmall` if a split is below its minimum."""
        sizes = {"training": (len(splits.train), self.min_train_records, "min-train-records"),
                 "test": (len(splits.test), self.min_eval_records, "min-eval-records")}
        if splits.validation is not None:
            sizes["validation"] = (len(splits.validation), self.min_eval_records,
                                   "min-eval-records")
        for part, (size, least, key) in sizes.items():
            if size < least:
                raise SplitTooSmall(
                    f"this site's own {part} split has {size} records, fewer than its "
                    f"node config's {key}={least}: it refuses runs on so few records")


@dataclass(frozen=True)
class SitePlacement:
    """Simulation: this client's partition. Deployment: its own data path, all of it,
    read with the columns its node config declares (None: the run config's) and split
    as its node config says (`own_split`)."""

    partition_id: int = 0
    num_partitions: int = 1
    data_path: str = ""  # a site's own file or folder (node config `data-path`)
    text_column: str | None = None
    label_column: str | None = None
    own_split: OwnSplit | None = None  # a deployed site's; None: the run config's
    account: str = ""  # node config `ledger-account`: its ledger account's name


@dataclass(frozen=True)
class DataSource:
    """What a site's ledger account is: its data source, whatever a run reads of it."""

    key: str  # SHA-256 of the account's name (a site's own data) or of the source
    records: int  # records the site's source holds (the delta rule's n)
    description: str  # for `site_ledger show`: the path or dataset, and the partition


def load_site(spec: RunSpec, placement: SitePlacement) -> Splits:
    """This site's train and test records, and its validation split if the run (a
    deployed site: its node config) asks for one, held out from its training records,
    seeded: the same on every run. A deployed site checks its minimum sizes."""
    own = placement.own_split
    splits = _train_and_test(spec, placement)
    fraction = own.validation_fraction if own else spec.data.validation_fraction
    if fraction:
        held_out = split(splits.train, fraction, _split_seed(spec, placement) + 1)
        splits = Splits(held_out.train, splits.test, held_out.test)
    if own:
        own.check_sizes(splits)
    return splits


def _split_seed(spec: RunSpec, placement: SitePlacement) -> int:
    """The run's seed; a deployed site's own (`split-seed`, else from its data's hash)."""
    own = placement.own_split
    if own is None:
        return spec.seed
    if own.seed is not None:
        return own.seed
    return int(_files_digest(Path(placement.data_path).expanduser())[:16], 16)


def load_simulated_sites(spec: RunSpec, sites: int
                         ) -> tuple[list[Splits], tuple[str, ...]]:
    """Every simulated site's splits, as each site reads them, and the label names of all
    their train and test records (in-process studies and benchmarks, not a deployment)."""
    splits = [load_site(spec, SitePlacement(i, sites)) for i in range(sites)]
    return splits, sorted_label_names({y for s in splits
                                       for y in s.train.labels + s.test.labels})


def data_source(spec: RunSpec, placement: SitePlacement, splits: Splits) -> DataSource:
    """The site's account. A site's own data (node config `data-path`): named by its
    node config's `ledger-account`, else by the data path (resolved), so runs with other
    seeds, record caps, validation fractions, tasks or columns charge one account, and
    so do the file's later versions (rows appended or changed never open a fresh
    budget). In simulation without a data path: the partition of the run's source."""
    if placement.data_path:
        path = Path(placement.data_path).expanduser().resolve()
        name = placement.account or f"path:{path}"
        key = hashlib.sha256(f"account\x1f{name}".encode()).hexdigest()
        return DataSource(key, _record_count(spec, placement),
                          f"{path}" + (f" (account {placement.account})"
                                       if placement.account else ""))
    data = spec.data
    if data.is_demo:
        source = f"{data.name}:{data.demo_records_per_site}"
    elif data.path:
        source = _files_digest(Path(data.path).expanduser())
    else:
        source = f"hub:{data.name}"
    where = f"partition {placement.partition_id} of {placement.num_partitions}"
    key = hashlib.sha256(f"{source}\x1f{where}".encode()).hexdigest()
    records = len(splits.train) + len(splits.test) + len(splits.validation or ())
    return DataSource(key, records, f"{data.path or data.name}, {where}")


def shareable_labels(found: set[str], declared: tuple[str, ...]) -> tuple[str, ...]:
    """The label values this site sends in the census: its declared set (node config
    `labels`), which must hold every value found; or, undeclared, the values found if
    they look like labels. Otherwise `LabelsWithheld`, naming no value."""
    if declared:
        outside = found - set(declared)
        if outside:
            raise LabelsWithheld(
                f"{len(outside)} label value(s) of this site's data are not in the labels "
                "its node config declares; the site declines the census (values in its "
                "own log only)")
        return declared
    longest = max((len(value) for value in found), default=0)
    if len(found) > MAX_SHARED_LABELS or longest > MAX_LABEL_CHARS:
        raise LabelsWithheld(
            f"the label column holds {len(found)} distinct values, the longest "
            f"{longest} characters: labels are at most {MAX_SHARED_LABELS} values of at "
            f"most {MAX_LABEL_CHARS} characters; the site declines to send them (set its "
            "node config's label-column, or declare labels=\"a,b,...\")")
    return tuple(sorted(found))


def _train_and_test(spec: RunSpec, placement: SitePlacement) -> Splits:
    data = spec.data
    text_column = placement.text_column or data.text_column
    label_column = _label_column(spec, placement)
    if placement.data_path:
        own = placement.own_split
        return load_local(placement.data_path, text_column, label_column,
                          _split_seed(spec, placement),
                          max_records=own.max_records if own else data.max_records)
    if data.is_demo:
        texts, labels = generate_site(placement.partition_id, data.demo_records_per_site,
                                      spec.seed)
        return split(LabelledText(tuple(texts), tuple(labels)), TEST_FRACTION, spec.seed)
    # Here only: flwr-datasets (with datasets, scipy, seaborn) takes ~1.5 s to import,
    # which a site with its own data or the demo task should not pay at start-up.
    if not data.path:
        from fed_dplora.data.hub import load_hub_site
        return load_hub_site(spec, placement.partition_id, placement.num_partitions,
                             text_column, label_column)
    from fed_dplora.data.partition import partition

    whole = load_local(data.path, text_column, label_column, spec.seed,
                       data.partition_column, data.max_records)

    return Splits(*(partition(part, data, placement.partition_id, placement.num_partitions,
                              spec.seed) for part in (whole.train, whole.test)))


def _label_column(spec: RunSpec, placement: SitePlacement) -> str:
    """A text-only task reads no label column (every record gets the label "")."""
    if not uses_labels(spec.task):
        return ""
    return placement.label_column or spec.data.label_column


def _record_count(spec: RunSpec, placement: SitePlacement) -> int:
    """Every record of a site's own file or folder (no record cap, no split)."""
    whole = load_local(placement.data_path, placement.text_column or spec.data.text_column,
                       _label_column(spec, placement), seed=0)
    return len(whole.train) + len(whole.test)


def _files_digest(path: Path) -> str:
    """SHA-256 over a file's bytes, or over every data file of a folder (by name)."""
    files = ([path] if path.is_file() else
             sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES))
    if not files:
        raise DataError(f"data path {str(path)!r}: no data file to identify the site's "
                        "ledger account by")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\x1f".encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\x1e")
    return digest.hexdigest()
