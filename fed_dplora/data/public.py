"""The public data the studies used, pinned: each file's raw copy at a fixed commit of a
public repository, and its SHA-256, so anyone can fetch the same bytes and check them.

    python -m fed_dplora.data prepare agnews data/agnews        # needs network
    python -m fed_dplora.data prepare agnews data/agnews --mirror /offline/copy/agnews

Every file is a verbatim copy (none is derived): sentence-level SST-2 as a sentiment
tutorial repository ships it; GLUE SST-2's train and dev (here train/dev) and AG News
(a 10,000-record dev set and the 7,600-record test set) from the MIT-licensed `alps`
repository; GLUE SST-2's dev set (here test: the split papers report) from a BERT
classification repository. SST and AG News are distributed for research use: say so
wherever results on them are published.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fed_dplora.data.sources import DataError

log = logging.getLogger("fed_dplora.data")
RAW = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
CLAIRETT = ("clairett/pytorch-sentiment-classification",
            "457ffd83de90a9d6d472d8ffc31bbffe40a8b236")
ALPS = ("forest-snow/alps", "3c7ef2c98249fc975a897b27f275695f97d5b7a9")
BRUNNURS = ("brunnurs/binary-classification-bert", "35e1628db50472679176dd31b992534a3866a86e")


@dataclass(frozen=True)
class PublicFile:
    name: str  # in the prepared folder
    source: tuple[str, str]  # (repository, commit)
    path: str  # in the repository
    sha256: str

    @property
    def url(self) -> str:
        repo, commit = self.source
        return RAW.format(repo=repo, commit=commit, path=self.path)


PUBLIC: dict[str, tuple[PublicFile, ...]] = {
    "sst2": (
        PublicFile("train.tsv", CLAIRETT, "data/SST2/train.tsv",
                   "ec192f833a64da08f475488a77b0d0b47db47acd0f458bd18433fc793b569920"),
        PublicFile("dev.tsv", CLAIRETT, "data/SST2/dev.tsv",
                   "eddea6b39e601dd4e7a672b53cc40fdf6019fa80522f351206c24340ca5d9359"),
        PublicFile("test.tsv", CLAIRETT, "data/SST2/test.tsv",
                   "831169c7e2e429d6026e1bdbb542f33b636e3e596caad9602ebc953c205928b7")),
    "sst2-glue": (
        PublicFile("train.tsv", ALPS, "data/SST-2/train.tsv",
                   "920e317b2c52e12cd22db1da2c6708312bd7dc4f3712b9bbf1b50ee6c2c792ba"),
        PublicFile("dev.tsv", ALPS, "data/SST-2/dev.tsv",
                   "92353770071a2a889f75d000a38a9e541ea8f0a5499e50f040b17917a5cbf66f"),
        PublicFile("test.tsv", BRUNNURS, "data/SST2/dev.tsv",
                   "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0")),
    "agnews": (
        PublicFile("dev.tsv", ALPS, "data/agnews/dev.tsv",
                   "7a0811e0006080bf4de17752c5466450ff3db778be71bc5bcf3c4e99b5f0803d"),
        PublicFile("test.tsv", ALPS, "data/agnews/test.tsv",
                   "e4217edd939f618f24a42b0988c56ec3cddf656d8dc279b9afa443dd1ab6a1c1")),
}


def prepare(name: str, out: str | Path, mirror: str | Path | None = None) -> dict[str, str]:
    """Fetch dataset `name`'s files into `out` (from `mirror`, a folder holding the same
    files, where given), check each against its pinned SHA-256, and return
    {file: sha256}. A file that does not match is refused and nothing of it is kept."""
    if name not in PUBLIC:
        raise DataError(f"dataset {name!r}: prepare knows {sorted(PUBLIC)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for file in PUBLIC[name]:
        data = (Path(mirror, file.name).read_bytes() if mirror else _download(file.url))
        digest = hashlib.sha256(data).hexdigest()
        if digest != file.sha256:
            raise DataError(f"{name}/{file.name} from {mirror or file.url}: SHA-256 {digest}, "
                            f"expected {file.sha256}; it is not the copy the studies used")
        tmp = out / f".{file.name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, out / file.name)
        log.info("%s  %s", digest, out / file.name)
    return {file.name: file.sha256 for file in PUBLIC[name]}


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.read()
    except OSError as err:
        raise DataError(f"cannot fetch {url} ({err}); prepare needs network, or "
                        "--mirror with a local copy of the files") from err
