"""Exit heads: small modules that turn a stage's features into class logits.

:class:`ClassifierHead` follows the usual classifier head (pool -> norm -> dropout -> linear)
and reads feature maps (B, C, H, W), tokens (B, T, D) or vectors (B, D).
:class:`DenseHead` is a 1x1 convolution for per-pixel outputs (B, C, H, W).
Both take the ``device``/``dtype`` factory arguments and can be given a new number of
classes with ``reset(num_classes)``.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exitguard.risk._validation import check_int

InputFormat = Literal["NCHW", "NLC", "NC"]
Pool = Literal["avg", "max", "cls", "none"]


def _check_rate(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a float in [0, 1); got {value!r}.")
    return float(value)


class ClassifierHead(nn.Module):
    """pool -> norm -> dropout -> (hidden layer) -> linear.

    Parameters
    ----------
    in_features : int
        Feature size: channels C of (B, C, H, W), width D of tokens (B, T, D) or of (B, D).
    num_classes : int
        Number of output classes.
    input_format : {"NCHW", "NLC", "NC"}, default "NCHW"
        Layout of the features: feature maps, tokens, or vectors.
    pool : {"avg", "max", "cls", "none"}, optional
        How features are reduced to one vector per sample: mean or max over positions,
        the first token (``"cls"``, tokens only), or nothing (vectors). Defaults to
        ``"avg"``, and to ``"none"`` for ``"NC"``.
    norm : bool, default True
        Layer-normalise the pooled vector (per sample, so results never depend on the
        batch).
    hidden_features : int, optional
        Width of a hidden layer (linear -> GELU) before the classifier.
    drop_rate : float, default 0.0
        Dropout before the classifier.
    device, dtype : optional
        Factory arguments for the parameters.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        input_format: InputFormat = "NCHW",
        pool: Pool | None = None,
        norm: bool = True,
        hidden_features: int | None = None,
        drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if input_format not in get_args(InputFormat):
            raise ValueError(
                f"`input_format` must be one of 'NCHW', 'NLC', 'NC'; got {input_format!r}."
            )
        pool = pool if pool is not None else ("none" if input_format == "NC" else "avg")
        allowed: tuple[str, ...] = {
            "NCHW": ("avg", "max"),
            "NLC": ("avg", "max", "cls"),
            "NC": ("none",),
        }[input_format]
        if pool not in allowed:
            raise ValueError(
                f"`pool` must be one of {', '.join(map(repr, allowed))} for input_format "
                f"{input_format!r}; got {pool!r}."
            )
        self.in_features = check_int(in_features, "in_features")
        self.input_format = input_format
        self.pool = pool
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(in_features, **factory) if norm else nn.Identity()
        self.drop = nn.Dropout(_check_rate(drop_rate, "drop_rate"))
        if hidden_features is None:
            self.hidden: nn.Module = nn.Identity()
            width = in_features
        else:
            width = check_int(hidden_features, "hidden_features")
            self.hidden = nn.Sequential(nn.Linear(in_features, width, **factory), nn.GELU())
        self.fc = nn.Linear(width, check_int(num_classes, "num_classes"), **factory)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def reset(self, num_classes: int) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs."""
        weight = self.fc.weight
        self.fc = nn.Linear(
            self.fc.in_features,
            check_int(num_classes, "num_classes"),
            device=weight.device,
            dtype=weight.dtype,
        )

    def forward_pool(self, x: Tensor) -> Tensor:
        """Reduce features to one vector per sample: (B, ...) -> (B, in_features)."""
        expected = {"NCHW": 4, "NLC": 3, "NC": 2}[self.input_format]
        if x.ndim != expected:
            raise ValueError(
                f"ClassifierHead with input_format {self.input_format!r} expects a "
                f"{expected}-D input; got shape {tuple(x.shape)}."
            )
        if self.input_format == "NCHW":
            return x.mean(dim=(2, 3)) if self.pool == "avg" else x.amax(dim=(2, 3))  # (B, C)
        if self.input_format == "NLC":
            if self.pool == "cls":
                return x[:, 0]  # (B, D)
            return x.mean(dim=1) if self.pool == "avg" else x.amax(dim=1)  # (B, D)
        return x  # (B, D)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_pool(x)  # (B, D)
        x = self.hidden(self.drop(self.norm(x)))  # (B, width)
        return self.fc(x)  # (B, num_classes)

    def extra_repr(self) -> str:
        return f"input_format={self.input_format!r}, pool={self.pool!r}"


class DenseHead(nn.Module):
    """Per-pixel exit head: dropout -> (1x1 conv -> ReLU) -> 1x1 conv -> resize.

    Parameters
    ----------
    in_channels : int
        Channels C of the feature map (B, C, H, W).
    num_classes : int
        Output channels (classes per pixel).
    hidden_channels : int, optional
        Width of a hidden 1x1 convolution.
    drop_rate : float, default 0.0
        Channel dropout before the classifier.
    out_size : tuple of int, optional
        Bilinear resize of the logits to (H_out, W_out), e.g. the resolution of the
        backbone's own output; by default the resolution is kept.
    device, dtype : optional
        Factory arguments for the parameters.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        hidden_channels: int | None = None,
        drop_rate: float = 0.0,
        out_size: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        width = check_int(in_channels, "in_channels")
        self.drop = nn.Dropout2d(_check_rate(drop_rate, "drop_rate"))
        if hidden_channels is None:
            self.hidden: nn.Module = nn.Identity()
        else:
            width = check_int(hidden_channels, "hidden_channels")
            self.hidden = nn.Sequential(nn.Conv2d(in_channels, width, 1, **factory), nn.ReLU())
        self.fc = nn.Conv2d(width, check_int(num_classes, "num_classes"), 1, **factory)
        if out_size is not None and (
            len(out_size) != 2 or not all(isinstance(s, int) and s > 0 for s in out_size)
        ):
            raise ValueError(f"`out_size` must be two positive integers (H, W); got {out_size!r}.")
        self.out_size = None if out_size is None else (int(out_size[0]), int(out_size[1]))

    @property
    def num_classes(self) -> int:
        return self.fc.out_channels

    def reset(self, num_classes: int) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs."""
        weight = self.fc.weight
        self.fc = nn.Conv2d(
            self.fc.in_channels,
            check_int(num_classes, "num_classes"),
            1,
            device=weight.device,
            dtype=weight.dtype,
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"DenseHead expects a (B, C, H, W) input; got shape {tuple(x.shape)}.")
        logits = self.fc(self.hidden(self.drop(x)))  # (B, num_classes, H, W)
        if self.out_size is not None and tuple(logits.shape[2:]) != self.out_size:
            logits = F.interpolate(logits, size=self.out_size, mode="bilinear", align_corners=False)
        return logits  # (B, num_classes, H_out, W_out)

    def extra_repr(self) -> str:
        return f"out_size={self.out_size}"
