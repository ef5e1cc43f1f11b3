"""Exit heads for a decoder LM: a light head into the model's own (tied) LM head, plus CALM's
cheap learned confidence.

Exit ``e`` sits after decoder layer ``exit_layers[e]`` (0-based). Its head is

    h  ->  h + up(down(h))      optional low-rank adapter (rank r, ``up`` starts at zero)
       ->  RMSNorm              initialised from the model's final norm
       ->  model.lm_head        shared and frozen

so an untrained head is exactly the "logit lens". The learned confidence of exit ``e`` is a
small MLP on the normalised state, trained to predict whether the exit's top-1 token agrees with
the last layer's (CALM's meta classifier); it costs ``H * c`` multiply-adds, against ``H * V``
for a softmax over the vocabulary.

Heads are saved as safetensors plus a JSON file with their configuration (never pickle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exitguard._files import (
    atomic_save,
    atomic_write_text,
    check_write_target,
    load_json,
    read_regular_file,
)
from exitguard.risk._validation import check_int, check_ints

_FORMAT = "exitguard.LMExitHeads"
_FORMAT_VERSION = 1


class HeadsFileError(ValueError):
    """Exit-head files that cannot be read, or that belong to another model."""


@dataclasses.dataclass(frozen=True)
class ExitHeadsConfig:
    """Where the exits sit and how big their heads are.

    Attributes
    ----------
    exit_layers : tuple of int
        0-based decoder layers after which an early exit sits, strictly increasing, all before
        the last layer (the last layer is always the final exit, the full model).
    hidden_size : int
        Width H of the decoder's hidden states.
    rank : int
        Rank of the low-rank adapter (0: norm only).
    confidence_width : int
        Width of the learned-confidence MLP.
    eps : float
        RMSNorm epsilon (the model's ``rms_norm_eps``).
    model_fingerprint : str
        Fingerprint of the model the heads were trained on ("" when unknown).
    """

    exit_layers: tuple[int, ...]
    hidden_size: int
    rank: int = 32
    confidence_width: int = 64
    eps: float = 1e-5
    model_fingerprint: str = ""

    def __post_init__(self) -> None:
        layers = tuple(int(layer) for layer in self.exit_layers)
        object.__setattr__(self, "exit_layers", layers)
        if not layers or any(b <= a for a, b in itertools.pairwise(layers)) or layers[0] < 0:
            raise ValueError(
                "`exit_layers` must be a non-empty, strictly increasing tuple of 0-based layer "
                f"indices; got {self.exit_layers!r}."
            )
        check_ints(self, ("hidden_size", "confidence_width"))
        check_int(self.rank, "rank", minimum=0)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["exit_layers"] = list(self.exit_layers)
        return data


def default_exit_layers(n_layers: int, *, every: int = 3) -> tuple[int, ...]:
    """Exits after every ``every``-th layer: ``every-1, 2*every-1, ...`` before the last layer.

    For SmolLM2's 30 layers and ``every=3``: after layers 2, 5, ..., 26 (nine early exits).

    >>> default_exit_layers(30)
    (2, 5, 8, 11, 14, 17, 20, 23, 26)
    >>> default_exit_layers(8, every=2)
    (1, 3, 5)
    """
    if every < 1 or n_layers < 2:
        raise ValueError(f"`every` must be >= 1 and `n_layers` >= 2; got {every!r}, {n_layers!r}.")
    layers = tuple(range(every - 1, n_layers - 1, every))
    if not layers:
        raise ValueError(f"no early exit fits: `every`={every} with {n_layers} layers.")
    return layers


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama's), written out."""

    def __init__(self, width: int, *, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)  # (..., 1)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)


class ExitHeads(nn.Module):
    """The early exits' heads (the final exit uses the model's own norm and LM head).

    Parameters
    ----------
    config : ExitHeadsConfig
        Exit positions and head sizes.
    final_norm_weight : tensor of shape (H,), optional
        Initial weight of every exit's norm (the model's final norm); ones when None.
    """

    def __init__(
        self, config: ExitHeadsConfig, *, final_norm_weight: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.config = config
        width, n_exits = config.hidden_size, len(config.exit_layers)
        norms = [RMSNorm(width, eps=config.eps) for _ in range(n_exits)]
        if final_norm_weight is not None:
            for norm in norms:
                norm.weight.data.copy_(final_norm_weight.detach().float())
        n_adapters = n_exits if config.rank else 0
        downs = [nn.Linear(width, config.rank, bias=False) for _ in range(n_adapters)]
        ups = [nn.Linear(config.rank, width, bias=False) for _ in range(n_adapters)]
        for up in ups:
            nn.init.zeros_(up.weight)  # start as the logit lens
        self.norms = nn.ModuleList(norms)
        self.down = nn.ModuleList(downs)
        self.up = nn.ModuleList(ups)
        self.confidence = nn.ModuleList(
            nn.Sequential(
                nn.Linear(width, config.confidence_width),
                nn.GELU(),
                nn.Linear(config.confidence_width, 1),
            )
            for _ in range(n_exits)
        )

    @property
    def n_early_exits(self) -> int:
        return len(self.config.exit_layers)

    def transform(self, exit_: int, hidden: torch.Tensor) -> torch.Tensor:
        """The state fed to the LM head at early exit ``exit_``: (..., H) -> (..., H)."""
        if self.config.rank:
            hidden = hidden + self.up[exit_](self.down[exit_](hidden))  # (..., H)
        return self.norms[exit_](hidden)  # (..., H)

    def confidence_logit(self, exit_: int, normed: torch.Tensor) -> torch.Tensor:
        """Learned confidence before the sigmoid, from :meth:`transform`'s output.

        Shapes: (..., H) -> (...).
        """
        return self.confidence[exit_](normed).squeeze(-1)  # (...)

    def macs_per_token(self) -> dict[str, int]:
        """Multiply-adds of the pieces of one exit, per token."""
        width = self.config.hidden_size
        return {
            "adapter": 2 * width * self.config.rank,
            "confidence": width * self.config.confidence_width + self.config.confidence_width,
        }

    def save(self, folder: str | os.PathLike[str], *, extra: dict[str, Any] | None = None) -> Path:
        """Write ``heads.safetensors`` and ``heads.json`` into ``folder`` (each atomically).

        ``heads.json`` is removed first and written last, so an interrupted save leaves no
        pair that :meth:`load` accepts as whole (it then fails to read ``heads.json``).
        """
        from safetensors.torch import save_file

        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        meta_path = target / "heads.json"
        if meta_path.is_symlink() or meta_path.exists():
            check_write_target(meta_path, argument="heads")
            meta_path.unlink()
        atomic_save(
            target / "heads.safetensors",
            lambda name: save_file(tensors, name),
            argument="heads",
        )
        meta = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "config": self.config.to_dict(),
            "fingerprint": heads_fingerprint(self),
            **(extra or {}),
        }
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n", argument="heads")
        return target

    @classmethod
    def load(
        cls, folder: str | os.PathLike[str], *, model_fingerprint: str | None = None
    ) -> ExitHeads:
        """Read heads written by :meth:`save`.

        Raises
        ------
        HeadsFileError
            Missing, special (a FIFO) or corrupted files, an unknown format, tensors that do not
            match the fingerprint recorded in ``heads.json``, or (when ``model_fingerprint``
            is given) heads trained on another model.
        """
        import safetensors
        from safetensors.torch import load as load_bytes

        source = Path(folder)
        meta = read_heads_meta(source)
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise HeadsFileError(f"{source / 'heads.json'} is not an exitguard exit-head file.")
        if meta.get("format_version") != _FORMAT_VERSION:
            raise HeadsFileError(
                f"`format_version` must be {_FORMAT_VERSION}; got {meta.get('format_version')!r}."
            )
        try:
            raw = dict(meta["config"])
            raw["exit_layers"] = tuple(raw["exit_layers"])
            config = ExitHeadsConfig(**raw)
        except (KeyError, TypeError, ValueError) as error:
            raise HeadsFileError(f"bad head configuration in {source}: {error}") from error
        if model_fingerprint is not None and config.model_fingerprint not in (
            "",
            model_fingerprint,
        ):
            raise HeadsFileError(
                f"the heads in {source} were trained on model {config.model_fingerprint}; "
                f"this model is {model_fingerprint}. Retrain them (`exitguard lm train-exits`)."
            )
        heads = cls(config)
        path = source / "heads.safetensors"
        try:
            size = os.stat(path).st_size
            data = read_regular_file(path, max_bytes=max(size, 8), argument="heads")
            heads.load_state_dict(load_bytes(data))
        except (OSError, ValueError, safetensors.SafetensorError, RuntimeError) as error:
            raise HeadsFileError(f"cannot read {path}: {error}") from error
        recorded = meta.get("fingerprint")
        if recorded is not None and recorded != heads_fingerprint(heads):
            raise HeadsFileError(
                f"the tensors in {path} do not match the fingerprint in heads.json: the "
                "files were damaged or mixed up. Retrain the heads (`exitguard lm train-exits`)."
            )
        heads.eval()
        return heads


def read_heads_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON metadata of a heads folder (strict JSON, at most 16 MiB); HeadsFileError else."""
    path = Path(folder) / "heads.json"
    try:
        meta = load_json(path, max_bytes=16 << 20, max_depth=16, argument="heads")
    except (OSError, ValueError) as error:
        raise HeadsFileError(f"cannot read {path}: {error}") from error
    if not isinstance(meta, dict):
        raise HeadsFileError(f"{path} is not an exitguard exit-head file.")
    return meta


def heads_fingerprint(heads: ExitHeads | None) -> str:
    """A short hash of exit heads: their configuration and every weight (``"none"``: no heads).

    A policy records it, so that it is only applied with the heads it was calibrated with.
    """
    if heads is None:
        return "none"
    digest = hashlib.sha256(json.dumps(heads.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(heads.state_dict().items()):  # a loop over the heads' tensors
        flat = tensor.detach().to("cpu", torch.float32).contiguous().reshape(-1)  # (N,)
        digest.update(f"{name}{tuple(tensor.shape)};".encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()[:16]
