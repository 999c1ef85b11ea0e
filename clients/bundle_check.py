"""Whether a coordinator's app bundle (FAB) would change the code that runs at a site.

A stock SuperNode installs the bundle and imports the ClientApp it names, with the
bundle's folder first on `sys.path`: the coordinator's code would train, noise, filter
and charge the site's ledger. The site runner (`clients.site_runner`) never imports
the bundle; it runs the installed fed-dplora, and refuses a bundle that says it would
run anything else, so a mismatch is visible, never silent:

- another ClientApp (`[tool.flwr.app.components] clientapp`);
- `fed_dplora` or `clients` modules that differ from the installed ones (changed,
  added or missing): another release, or a modified one;
- Python code outside the project's own packages (a stock SuperNode would let it
  shadow an installed package, `opacus` or `dp_accounting` say).

The installed code's digest (`installed_digest`) is what a hospital pins: the same
SHA-256 over the reviewed release's files, printed by `fed-dplora-site digest`.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from pathlib import Path, PurePosixPath

import clients
import fed_dplora

CLIENT_APP = "clients.client_app:app"
INSTALLED = {"fed_dplora": Path(fed_dplora.__file__).parent,
             "clients": Path(clients.__file__).parent}
# Top-level packages a bundle may carry besides the site's own: server and study code.
SERVER_SIDE = ("strategies", "server", "experiments", "tests")
# What the check reads of a bundle, at most: a zip bomb is refused on its headers.
MAX_MEMBERS = 10_000
MAX_MEMBER_BYTES = 4 << 20  # one member it reads (pyproject.toml, a package's .py file)
MAX_READ_BYTES = 64 << 20  # all the members it reads


class BundleRefused(RuntimeError):
    """The bundle would change what runs at this site."""


def installed_digest() -> str:
    """SHA-256 over the installed `fed_dplora` and `clients` modules (path, content)."""
    return _digest(_installed_files())


def check_bundle(fab: bytes) -> str:
    """The bundle's digest of `fed_dplora` and `clients`; raises `BundleRefused` with
    the reason if the bundle would change what runs at this site."""
    names, shipped, project = _read_bundle(fab)
    component = _client_app_component(project)
    if component != CLIENT_APP:
        raise BundleRefused(f"the bundle names ClientApp {component!r}; this site runs only "
                            f"its installed {CLIENT_APP}")
    foreign = sorted({PurePosixPath(n).parts[0] for n in names if n.endswith(".py")}
                     - set(INSTALLED) - set(SERVER_SIDE))
    if foreign:
        raise BundleRefused(f"the bundle carries Python code outside fed-dplora's packages "
                            f"({foreign}), which a stock SuperNode would put before this "
                            "site's installed packages")
    installed = _installed_files()
    changed = sorted(n for n in shipped.keys() | installed.keys()
                     if shipped.get(n) != installed.get(n))
    if changed:
        raise BundleRefused(f"the bundle's fed_dplora/clients differ from this site's "
                            f"installed release in {len(changed)} file(s) {changed[:5]} "
                            f"(bundle {_digest(shipped)[:16]}, installed "
                            f"{_digest(installed)[:16]}): install the same reviewed "
                            "release on both sides")
    return _digest(shipped)


def _read_bundle(fab: bytes) -> tuple[list[str], dict[str, bytes], bytes | None]:
    """(every file name, the site's packages' .py files, pyproject.toml or None),
    reading only those members, each within `MAX_MEMBER_BYTES` and all within
    `MAX_READ_BYTES` as their headers state (zipfile reads no more than a header says,
    and a member longer than its header fails its CRC)."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
            members = [m for m in bundle.infolist() if not m.is_dir()]
            if len(members) > MAX_MEMBERS:
                raise BundleRefused(f"the bundle holds {len(members)} files, more than the "
                                    f"{MAX_MEMBERS} this site reads")
            wanted = [m for m in members if m.filename == "pyproject.toml" or (
                PurePosixPath(m.filename).parts[0] in INSTALLED
                and m.filename.endswith(".py"))]
            _check_sizes(wanted)
            read = {m.filename: bundle.read(m) for m in wanted}
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise BundleRefused(f"the bundle cannot be read as a Flower app bundle ({err})"
                            ) from err
    project = read.pop("pyproject.toml", None)
    return [m.filename for m in members], read, project


def _check_sizes(members: list[zipfile.ZipInfo]) -> None:
    """`BundleRefused` before reading, when the members to read are too large."""
    largest = max(members, key=lambda m: m.file_size, default=None)
    if largest is not None and largest.file_size > MAX_MEMBER_BYTES:
        raise BundleRefused(f"the bundle's {largest.filename} is {largest.file_size} bytes "
                            f"uncompressed, more than the {MAX_MEMBER_BYTES} this site reads")
    total = sum(m.file_size for m in members)
    if total > MAX_READ_BYTES:
        raise BundleRefused(f"the bundle's files to check are {total} bytes uncompressed, "
                            f"more than the {MAX_READ_BYTES} this site reads")


def _client_app_component(project: bytes | None) -> str | None:
    if project is None:
        return None
    try:
        project = tomllib.loads(project.decode())
        return project["tool"]["flwr"]["app"]["components"]["clientapp"]
    except (KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None


def _installed_files() -> dict[str, bytes]:
    """{bundle-style path: content} of the installed modules a bundle would carry
    (Flower's build leaves out test_*.py and *_test.py)."""
    files = {}
    for package, folder in INSTALLED.items():
        for path in folder.rglob("*.py"):
            if "__pycache__" in path.parts or path.name.startswith("test_") \
                    or path.name.endswith("_test.py"):
                continue
            files[f"{package}/{path.relative_to(folder).as_posix()}"] = path.read_bytes()
    return files


def _digest(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\x1f{hashlib.sha256(files[name]).hexdigest()}\x1e".encode())
    return digest.hexdigest()
