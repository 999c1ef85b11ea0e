"""Labelled text from local files, as plain (texts, labels) pairs (a dataset by name:
`fed_dplora.data.hub`).

Local data (`data.path`): a csv / tsv / jsonl / parquet file, or a folder holding a
`train.*` file and a `test.*` (or `dev.*`) file. Delimited files may have a header row
with the configured text and label columns, or no header and exactly two columns
(text, label), as SST-2 and AG News ship. Labels may be integers or strings.

A text-only task (causal-lm) reads with `label_column=""`: only the text column is
needed (a headerless file's first column), and every record gets the label "".
"""

from __future__ import annotations

import csv
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas (0.4 s) loads only where a file is read, not for demo data
    import pandas as pd

log = logging.getLogger(__name__)

SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
TEST_FRACTION = 0.2


class DataError(ValueError):
    """A data file or dataset cannot be read as labelled text."""


@dataclass(frozen=True)
class LabelledText:
    texts: tuple[str, ...]
    labels: tuple[str, ...]  # raw label values as strings; mapped to ids later
    groups: tuple[str, ...] = ()  # values of data.partition-column, when one is read

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class Splits:
    train: LabelledText
    test: LabelledText
    validation: LabelledText | None = None  # held out from train (data.validation-fraction)


def load_local(path: str | Path, text_column: str, label_column: str,
               seed: int, group_column: str = "", max_records: int = 0) -> Splits:
    """Read `path` (file or train/test folder); a single file is split 80/20 by seed.

    `group_column` (natural partitioning) is read into `LabelledText.groups`;
    `max_records` > 0 keeps only the first that many rows of each file.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        train_file = _find(path, ("train",))
        test_file = _find(path, ("test", "dev"))
        return Splits(*(_read_file(file, text_column, label_column, group_column,
                                   max_records) for file in (train_file, test_file)))
    if not path.is_file():
        raise DataError(f"data.path={str(path)!r}: no such file or folder")
    return split(_read_file(path, text_column, label_column, group_column, max_records),
                 TEST_FRACTION, seed)


def split(data: LabelledText, test_fraction: float, seed: int) -> Splits:
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    cut = int(round(len(order) * (1 - test_fraction)))
    pick = lambda idx: LabelledText(tuple(data.texts[i] for i in idx),  # noqa: E731
                                    tuple(data.labels[i] for i in idx),
                                    tuple(data.groups[i] for i in idx) if data.groups else ())
    return Splits(pick(order[:cut]), pick(order[cut:]))


def _find(folder: Path, stems: tuple[str, ...]) -> Path:
    for stem in stems:
        for suffix in SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    raise DataError(f"data.path={str(folder)!r}: expected a file named "
                    f"{' or '.join(stems)} with suffix {' / '.join(SUFFIXES)}")


def _read_file(path: Path, text_column: str, label_column: str,
               group_column: str = "", max_records: int = 0) -> LabelledText:
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported suffix {suffix!r}; use {' / '.join(SUFFIXES)}")
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix == ".jsonl":
            frame = pd.read_json(path, lines=True)
        else:
            frame = _read_delimited(path, "\t" if suffix == ".tsv" else ",",
                                    text_column, label_column)
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise DataError(f"{path}: cannot parse as {suffix[1:]}: {err}") from err
    if max_records:
        frame = frame.head(max_records)
    return _from_frame(frame, text_column, label_column, str(path), group_column)


def _read_delimited(path: Path, sep: str, text_column: str,
                    label_column: str) -> pd.DataFrame:
    import pandas as pd

    with path.open(newline="", encoding="utf-8") as handle:
        first = next(csv.reader(handle, delimiter=sep, quoting=csv.QUOTE_NONE), [])
    header = text_column in first and (not label_column or label_column in first)
    if not header and (text_column in first or (label_column and label_column in first)):
        raise DataError(
            f"{path}: first row {first[:5]} looks like a header but lacks "
            f"data.text-column={text_column!r} or data.label-column={label_column!r}; "
            f"set both to names in it (for example data.text-column="
            f"{next((c for c in first if c != label_column), first[0])!r})")
    if not header and not label_column and len(first) in (1, 2):
        log.info("%s has no header row with %r: reading its first column as the text",
                 path, text_column)
        return pd.read_csv(path, sep=sep, header=None, usecols=[0], names=[text_column],
                           quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL,
                           dtype=str, keep_default_na=False)
    if not header and len(first) != 2:
        raise DataError(
            f"{path}: first row has columns {first[:5]}; set data.text-column and "
            "data.label-column to names in a header row, or give a headerless file with "
            "exactly two columns (text, label)")
    if not header:
        log.info("%s has no header row with %r/%r: reading it as two columns "
                 "(text, label)", path, text_column, label_column)
    # QUOTE_NONE: texts such as AG News contain bare quotes that are not CSV quoting.
    return pd.read_csv(path, sep=sep, header=0 if header else None,
                       names=None if header else [text_column, label_column],
                       quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL,
                       dtype=str, keep_default_na=False)


def _from_frame(frame: pd.DataFrame, text_column: str, label_column: str,
                source: str, group_column: str = "") -> LabelledText:
    wanted = [c for c in (text_column, label_column, group_column) if c]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: no column(s) {missing}; columns are "
                        f"{list(frame.columns)} (set data.text-column / data.label-column"
                        " / data.partition-column)")
    texts = frame[text_column].astype(str).tolist()
    labels = (frame[label_column].astype(str).str.strip().tolist() if label_column
              else [""] * len(texts))
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty or (label_column and any(not lab for lab in labels)):
        raise DataError(f"{source}: empty text or label in row(s) "
                        f"{empty[:5] or [i for i, v in enumerate(labels) if not v][:5]}")
    if not texts:
        raise DataError(f"{source}: no records")
    groups = tuple(frame[group_column].astype(str)) if group_column else ()
    return LabelledText(tuple(texts), tuple(labels), groups)


def sorted_label_names(labels: set[str]) -> tuple[str, ...]:
    """Numeric labels in numeric order, others alphabetically."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))
