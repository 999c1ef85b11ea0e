"""A mutant: a small patch that removes or weakens one fix, and the tests that must then
fail."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Edit:
    """Replace `old` (which must occur exactly once) by `new` in `file`."""

    file: str  # relative to the repository root
    old: str
    new: str


@dataclass(frozen=True)
class Mutant:
    name: str
    kills: tuple[str, ...]  # test ids under tests/ ("test_x.py::test_y" or "...[param]")
    edits: tuple[Edit, ...]

    def apply(self, root: Path) -> dict[Path, str]:
        """Patch the tree at `root`; returns each changed file's original text. Raises
        `StaleMutant` when an edit's text no longer occurs exactly once, or the patched
        file does not compile (a mutant must weaken behaviour, not break the import)."""
        originals: dict[Path, str] = {}
        for edit in self.edits:
            path = root / edit.file
            current = path.read_text()
            originals.setdefault(path, current)
            if current.count(edit.old) != 1:
                restore(originals)
                raise StaleMutant(f"mutant {self.name!r}: {edit.file} holds its text "
                                  f"{current.count(edit.old)} times, not once: {edit.old!r}")
            patched = current.replace(edit.old, edit.new)
            try:
                compile(patched, str(path), "exec")
            except SyntaxError as error:
                restore(originals)
                raise StaleMutant(f"mutant {self.name!r} breaks {edit.file}: {error}") from None
            path.write_text(patched)
        return originals


class StaleMutant(Exception):
    """A mutant that no longer applies to the code it names."""


def mutant(name: str, kills: str | tuple[str, ...], file: str, old: str, new: str,
           *more: Edit) -> Mutant:
    """One mutant of one edit (`more` adds edits), killed by `kills`."""
    kills = (kills,) if isinstance(kills, str) else tuple(kills)
    return Mutant(name, kills, (Edit(file, old, new), *more))


def restore(originals: dict[Path, str]) -> None:
    for path, text in originals.items():
        path.write_text(text)
