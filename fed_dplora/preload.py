"""Import a heavy module in the background, one module at a time per process.

The Flower apps use this to overlap their torch / transformers / PEFT imports with the
census. All background imports of a process run in one thread, one after the other:
two threads importing the same heavy packages at once can deadlock-avoid into
half-initialized modules ("cannot import name ..."). Callers must not import those
packages on another thread while a preload runs; they wait on the future instead.
"""

from __future__ import annotations

import importlib
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from types import ModuleType

_IMPORTER = ThreadPoolExecutor(1, thread_name_prefix="fed-dplora-preload")


@lru_cache(maxsize=None)
def preload(module: str) -> Future[ModuleType]:
    """The module, imported once per process in the background thread."""
    return _IMPORTER.submit(importlib.import_module, module)
