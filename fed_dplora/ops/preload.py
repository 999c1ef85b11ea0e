"""Import a heavy module in the background, one module at a time per process.

The ServerApp uses this to overlap its torch / transformers / PEFT imports with the
census, during which its own thread only exchanges messages. All background imports of
a process run in one thread, one after the other: two threads importing the same heavy
packages at once can deadlock-avoid into half-initialized modules ("cannot import
name ..."). So a process must not import those packages (or load data with
flwr-datasets, which inspects transformers) on another thread while a preload runs;
it waits on the future instead. A simulated client process does load data between
messages, so the ClientApp imports its heavy half in its own thread, on first use.
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
