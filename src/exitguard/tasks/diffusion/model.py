"""A small U-ViT noise predictor with an exit and an uncertainty module after every block.

The backbone follows U-ViT (Bao et al., 2023), as DeeDiff does: the image is cut into patches,
the timestep becomes one extra token, and ``L = depth`` transformer blocks run in three parts,
``(L - 1) / 2`` input blocks, one middle block and ``(L - 1) / 2`` output blocks; every output
block first mixes in the matching input block's tokens (a *long skip*, concatenate then
linear), the input blocks' outputs being consumed last-in first-out.

Exits (0-based, one per block): exit ``l`` reads the tokens after block ``l`` and predicts the
noise, ``eps_l``; the last exit (after the last block) is the full model. Each exit has its own
layer norm, linear patch decoder and 3x3 convolution (DeeDiff shares the linear decoder across
exits; separate ones cost no extra FLOPs and let a shallow exit fit its own features).

The uncertainty estimation module (UEM) of every exit but the last predicts the per-pixel
error of that exit's noise prediction, ``u_l`` in (0, 1): its input is the exit's patch tokens
concatenated with a sinusoidal embedding of the timestep of width ``width / 4``, and it is
``Linear -> SiLU -> Linear -> Sigmoid``, unpatchified. DeeDiff's UEM has a hidden width of
``4 * width``; here it is ``uem_ratio * width`` (default ``width``) because the UEMs of every
candidate exit run at every denoising step, so their cost is paid whether or not a sample
leaves. The *confidence* of exit ``l`` is ``1 - mean(u_l)`` over (C, H, W).

Two passes:

- :meth:`Denoiser.forward` runs every block, exit and UEM (training, the ``simulate``
  reference);
- :meth:`Denoiser.denoise` is the early-exit step: after each block only the samples still
  running go on (batch compaction), the UEM of an exit runs only on samples for which it is a
  candidate, and the exit head runs only on the samples that leave there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exitguard.risk._validation import check_int


@dataclasses.dataclass(frozen=True)
class DenoiserConfig:
    """Architecture and noise schedule of a :class:`Denoiser`.

    Attributes
    ----------
    image_size : int
        Height and width of the (square) images.
    channels : int
        Image channels.
    patch_size : int
        Side of the square patches; must divide ``image_size``.
    width : int
        Token width D; a multiple of ``n_heads`` and of 4.
    depth : int
        Number of blocks L (odd, >= 3): ``(L - 1) / 2`` input, one middle, ``(L - 1) / 2``
        output blocks. There is one exit per block.
    n_heads : int
        Attention heads.
    mlp_ratio : int
        Hidden width of the blocks' MLPs, in multiples of D.
    uem_ratio : int
        Hidden width of the uncertainty modules, in multiples of D.
    steps : int
        Diffusion steps T.
    beta_start, beta_end : float
        The linear beta schedule as defined for ``reference_steps`` steps (DDPM's 1e-4 to
        0.02 over 1000 steps); see :func:`exitguard.tasks.diffusion.sample.linear_betas`.
    reference_steps : int
        Steps the schedule's end points refer to.
    """

    image_size: int = 8
    channels: int = 1
    patch_size: int = 2
    width: int = 64
    depth: int = 7
    n_heads: int = 4
    mlp_ratio: int = 4
    uem_ratio: int = 1
    steps: int = 100
    beta_start: float = 1e-4
    beta_end: float = 0.02
    reference_steps: int = 1000

    def __post_init__(self) -> None:
        for name in (
            "image_size",
            "channels",
            "patch_size",
            "width",
            "depth",
            "n_heads",
            "mlp_ratio",
            "uem_ratio",
            "steps",
            "reference_steps",
        ):
            check_int(getattr(self, name), name)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"`patch_size` must divide `image_size` ({self.image_size}); got {self.patch_size}."
            )
        if self.depth < 3 or self.depth % 2 == 0:
            raise ValueError(f"`depth` must be an odd integer >= 3; got {self.depth}.")
        if self.width % self.n_heads or self.width % 4:
            raise ValueError(
                f"`width` must be a multiple of `n_heads` ({self.n_heads}) and of 4; "
                f"got {self.width}."
            )
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(
                "`beta_start` and `beta_end` must satisfy 0 < beta_start < beta_end < 1; "
                f"got {self.beta_start!r} and {self.beta_end!r}."
            )
        if self.beta_end * self.reference_steps / self.steps >= 1.0:
            raise ValueError(
                "`beta_end * reference_steps / steps` (the last beta after scaling to `steps`) "
                f"must be below 1; got {self.beta_end * self.reference_steps / self.steps:g}. "
                "Lower `reference_steps` or raise `steps`."
            )

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size**2

    @property
    def n_exits(self) -> int:
        return self.depth

    @property
    def n_input_blocks(self) -> int:
        return (self.depth - 1) // 2

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.channels, self.image_size, self.image_size


def timestep_embedding(t: Tensor, dim: int, *, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps: (B,) -> (B, dim), float32.

    The same ``t`` always gives the same row, whatever else is in the batch.
    """
    half = dim // 2
    frequencies = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (dim/2,)
    angles = t.float()[:, None] * frequencies[None]  # (B, dim/2)
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, 2*(dim/2))
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, C*p*p), patches in row-major order."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)  # (B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: Tensor, *, channels: int, patch_size: int) -> Tensor:
    """(B, N, C*p*p) -> (B, C, H, W); the inverse of :func:`patchify` for square images."""
    b, n, _ = tokens.shape
    side = math.isqrt(n)
    p = patch_size
    x = tokens.reshape(b, side, side, channels, p, p)  # (B, h, w, C, p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
    return x.reshape(b, channels, side * p, side * p)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask)."""

    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x (B, N, D)
        q = q.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, h, N, D/h)
        k = k.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, h, N, D/h)
        v = v.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, h, N, D/h)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, D/h)
        y = y.transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        return self.proj(y)


class Block(nn.Module):
    """A pre-norm transformer block; an output block first mixes in its long skip."""

    def __init__(self, width: int, n_heads: int, mlp_ratio: int, *, skip: bool) -> None:
        super().__init__()
        self.skip = nn.Linear(2 * width, width) if skip else None
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, n_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.skip is not None:
            if skip is None:
                raise ValueError("an output block needs the tokens of its input block (`skip`).")
            x = self.skip(torch.cat([x, skip], dim=-1))  # (B, 1+N, D)
        x = x + self.attn(self.norm1(x))  # (B, 1+N, D)
        return x + self.mlp(self.norm2(x))  # (B, 1+N, D)


class ExitHead(nn.Module):
    """Patch tokens -> noise prediction: norm, linear patch decoder, unpatchify, 3x3 conv."""

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.channels, self.patch_size = config.channels, config.patch_size
        self.norm = nn.LayerNorm(config.width)
        self.decoder = nn.Linear(config.width, config.patch_dim)
        self.conv = nn.Conv2d(config.channels, config.channels, 3, padding=1)

    def forward(self, tokens: Tensor) -> Tensor:
        patches = self.decoder(self.norm(tokens))  # (B, N, C*p*p)
        image = unpatchify(patches, channels=self.channels, patch_size=self.patch_size)
        return self.conv(image)  # (B, C, H, W)


class UncertaintyHead(nn.Module):
    """The UEM: (patch tokens, timestep embedding) -> per-pixel uncertainty in (0, 1)."""

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.channels, self.patch_size = config.channels, config.patch_size
        hidden = config.uem_ratio * config.width
        self.norm = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(
            nn.Linear(config.width + config.width // 4, hidden),
            nn.SiLU(),
            nn.Linear(hidden, config.patch_dim),
        )

    def tokens(self, tokens: Tensor, time: Tensor) -> Tensor:
        """Per-patch uncertainties (B, N, C*p*p) in (0, 1); ``time`` is (B, D/4)."""
        time = time[:, None].expand(-1, tokens.shape[1], -1)  # (B, N, D/4)
        return torch.sigmoid(self.mlp(torch.cat([self.norm(tokens), time], dim=-1)))

    def forward(self, tokens: Tensor, time: Tensor) -> Tensor:
        u = self.tokens(tokens, time)  # (B, N, C*p*p)
        return unpatchify(u, channels=self.channels, patch_size=self.patch_size)  # (B, C, H, W)


@dataclasses.dataclass(frozen=True)
class ExitOutputs:
    """Every exit's noise prediction and every intermediate exit's uncertainty.

    Attributes
    ----------
    eps : Tensor of shape (B, L, C, H, W)
        Noise prediction of each exit; ``eps[:, -1]`` is the full model's.
    uncertainty : Tensor of shape (B, L - 1, C, H, W)
        Per-pixel uncertainty in (0, 1) of each exit but the last.
    """

    eps: Tensor
    uncertainty: Tensor

    @property
    def confidence(self) -> Tensor:
        """(B, L - 1) float64: ``1 - mean(u)`` over (C, H, W), exits ``0..L-2``."""
        return 1.0 - self.uncertainty.double().flatten(2).mean(-1)


class Denoiser(nn.Module):
    """U-ViT noise predictor ``eps(x_t, t)`` with an exit and a UEM after every block.

    Parameters
    ----------
    config : DenoiserConfig

    Examples
    --------
    >>> import torch
    >>> model = Denoiser(DenoiserConfig(width=32, depth=3, n_heads=2))
    >>> out = model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 5]))
    >>> tuple(out.eps.shape), tuple(out.uncertainty.shape)
    ((2, 3, 1, 8, 8), (2, 2, 1, 8, 8))
    """

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        if not isinstance(config, DenoiserConfig):
            raise TypeError(f"`config` must be a DenoiserConfig; got {type(config).__name__}.")
        self.config = config
        d = config.width
        self.patch_embed = nn.Conv2d(
            config.channels, d, config.patch_size, stride=config.patch_size
        )
        self.time_embed = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.n_patches, d))
        n_in = config.n_input_blocks
        self.blocks = nn.ModuleList(
            Block(d, config.n_heads, config.mlp_ratio, skip=index > n_in)
            for index in range(config.depth)
        )
        self.exits = nn.ModuleList(ExitHead(config) for _ in range(config.n_exits))
        self.uems = nn.ModuleList(UncertaintyHead(config) for _ in range(config.n_exits - 1))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def n_exits(self) -> int:
        """Number of exits L (one per block; the last is the full model)."""
        return self.config.n_exits

    @property
    def fingerprint(self) -> str:
        """A short hash of the architecture (config, tensor names and shapes), not the weights.

        A policy records it so that it is only applied to the model it was calibrated for.
        """
        digest = hashlib.sha256(repr(self.config).encode())
        for name, tensor in self.state_dict().items():
            digest.update(f"{name}{tuple(tensor.shape)};".encode())
        return digest.hexdigest()[:16]

    # ----------------------------------------------------------------- checks

    def check_input(self, x: Any, t: Any) -> Tensor:
        """Check a batch ``x`` (B, C, H, W) and its timesteps; returns ``t`` as (B,) int64."""
        if not isinstance(x, Tensor):
            raise TypeError(f"`x` must be a torch.Tensor; got {type(x).__name__}.")
        expected = self.config.image_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != expected or x.shape[0] == 0:
            raise ValueError(
                f"`x` must have shape (B, {', '.join(map(str, expected))}) with B >= 1; "
                f"got {tuple(x.shape)}."
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],) or t.dtype.is_floating_point:
            raise ValueError(
                f"`t` must be an integer timestep or a (B,) = ({x.shape[0]},) integer tensor; "
                f"got shape {tuple(t.shape)} and dtype {t.dtype}."
            )
        t = t.long()
        if bool((t < 0).any() | (t >= self.config.steps).any()):
            raise ValueError(
                f"`t` must lie in [0, {self.config.steps - 1}]; got values in "
                f"[{int(t.min())}, {int(t.max())}]."
            )
        return t

    def check_earliest_exit(self, earliest_exit: Any) -> int:
        """``earliest_exit`` as an int in [0, L - 1], or a ValueError naming the range."""
        last = self.n_exits - 1
        if (
            isinstance(earliest_exit, bool)
            or not isinstance(earliest_exit, int)
            or not 0 <= earliest_exit <= last
        ):
            raise ValueError(
                f"`earliest_exit` must be an integer in [0, {last}] (the model has "
                f"{self.n_exits} exits); got {earliest_exit!r}."
            )
        return earliest_exit

    # ----------------------------------------------------------------- pieces

    def embed(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens before block 0 (B, 1+N, D) and the UEMs' time embedding (B, D/4)."""
        d = self.config.width
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        time_token = self.time_embed(timestep_embedding(t, d))[:, None]  # (B, 1, D)
        tokens = torch.cat([time_token, patches], dim=1) + self.pos_embed  # (B, 1+N, D)
        return tokens, timestep_embedding(t, d // 4)  # (B, 1+N, D), (B, D/4)

    def run_block(self, index: int, h: Tensor, skips: list[Tensor]) -> Tensor:
        """Block ``index`` on ``h`` (B, 1+N, D); input blocks push onto ``skips``, output
        blocks pop from it (U-ViT's long skips)."""
        n_in = self.config.n_input_blocks
        block = self.blocks[index]
        if index < n_in:
            h = block(h)  # (B, 1+N, D)
            skips.append(h)
        elif index == n_in:
            h = block(h)  # (B, 1+N, D), the middle block
        else:
            h = block(h, skips.pop())  # (B, 1+N, D)
        return h

    # ----------------------------------------------------------------- passes

    def forward(self, x: Tensor, t: Tensor | int) -> ExitOutputs:
        """Every exit's noise prediction and every UEM's uncertainty, in one full pass.

        Parameters
        ----------
        x : Tensor of shape (B, C, H, W)
            Noisy images x_t.
        t : int or int Tensor of shape (B,)
            Timesteps in [0, T - 1].
        """
        t = self.check_input(x, t)
        h, time = self.embed(x, t)  # (B, 1+N, D), (B, D/4)
        skips: list[Tensor] = []
        eps, uncertainty = [], []
        for index in range(self.n_exits):
            h = self.run_block(index, h, skips)  # (B, 1+N, D)
            eps.append(self.exits[index](h[:, 1:]))  # (B, C, H, W)
            if index < self.n_exits - 1:
                uncertainty.append(self.uems[index](h[:, 1:], time))  # (B, C, H, W)
        return ExitOutputs(torch.stack(eps, dim=1), torch.stack(uncertainty, dim=1))

    def full(self, x: Tensor, t: Tensor | int) -> Tensor:
        """The full model's noise prediction (B, C, H, W): every block, the last exit only."""
        t = self.check_input(x, t)
        h, _ = self.embed(x, t)  # (B, 1+N, D)
        skips: list[Tensor] = []
        for index in range(self.n_exits):
            h = self.run_block(index, h, skips)  # (B, 1+N, D)
        return self.exits[-1](h[:, 1:])  # (B, C, H, W)

    def denoise(
        self, x: Tensor, t: Tensor | int, *, threshold: Tensor, earliest_exit: int = 1
    ) -> tuple[Tensor, Tensor]:
        """One early-exit noise prediction that really skips the blocks a sample does not need.

        Exit rule: a sample leaves at the first exit ``l >= earliest_exit`` (``l < L - 1``)
        whose confidence ``1 - mean(u_l)`` is ``>= threshold`` (its threshold of exit ``l``
        for a threshold vector); else at the last exit. After each block only the samples
        still running go on; the UEM of exit ``l`` runs only on running samples with a finite
        threshold at that exit when ``l >= earliest_exit``, and an exit's head only on the
        samples that leave there. With every threshold ``inf`` the result is :meth:`full`'s,
        computed by the same operations.

        Parameters
        ----------
        x : Tensor of shape (B, C, H, W)
        t : int or int Tensor of shape (B,)
        threshold : float64 Tensor of shape (B,) or (B, L - 1)
            Each sample's threshold in [0, 1], or ``inf`` (never exit early), or one per
            sample and exit (``inf`` disables an exit). Not checked here (see
            :func:`exitguard.tasks.diffusion.sample.exit_limits`).
        earliest_exit : int
            No sample leaves before this exit.

        Returns
        -------
        eps : Tensor of shape (B, C, H, W)
            The noise prediction of the exit each sample took.
        exits : int64 Tensor of shape (B,)
            The exit each sample took.
        """
        t = self.check_input(x, t)
        last = self.n_exits - 1
        n = x.shape[0]
        h, time = self.embed(x, t)  # (A, 1+N, D), (A, D/4)
        rows = torch.arange(n, device=x.device)  # (A,) batch rows still running
        limit = threshold.to(device=x.device, dtype=torch.float64)  # (A,) or (A, L-1)
        if limit.ndim == 1:
            limit = limit[:, None].expand(n, last)  # (A, L-1) one threshold per exit
        eps = x.new_empty(x.shape)  # (B, C, H, W)
        exits = torch.full((n,), last, dtype=torch.long, device=x.device)  # (B,)
        skips: list[Tensor] = []
        for index in range(last):
            h = self.run_block(index, h, skips)  # (A, 1+N, D)
            if index < earliest_exit:
                continue
            here = limit[:, index]  # (A,) each running sample's threshold at this exit
            candidate = torch.isfinite(here)  # (A,) rows whose exit rule can fire
            if not bool(candidate.any()):
                continue
            uem: UncertaintyHead = self.uems[index]  # type: ignore[assignment]
            if bool(candidate.all()):  # the usual case: no copy of the running rows
                u = uem.tokens(h[:, 1:], time)  # (A, N, C*p*p)
                fire = 1.0 - u.double().flatten(1).mean(-1) >= here  # (A,)
            else:
                u = uem.tokens(h[candidate, 1:], time[candidate])  # (a, N, C*p*p)
                fire = torch.zeros_like(candidate)  # (A,)
                fire[candidate] = 1.0 - u.double().flatten(1).mean(-1) >= here[candidate]
            if not bool(fire.any()):
                continue
            eps[rows[fire]] = self.exits[index](h[fire, 1:])  # (F, C, H, W)
            exits[rows[fire]] = index
            keep = ~fire  # compact: only the samples still running go on
            if not bool(keep.any()):
                return eps, exits
            rows, h, time, limit = rows[keep], h[keep], time[keep], limit[keep]
            skips = [s[keep] for s in skips]
        h = self.run_block(last, h, skips)  # (A, 1+N, D)
        eps[rows] = self.exits[last](h[:, 1:])  # (A, C, H, W)
        return eps, exits


def exit_flops(model: Denoiser, *, earliest_exit: int = 1) -> dict[str, Any]:
    """FLOPs of one sample through one denoising step, per piece and per exit.

    Counted with :func:`exitguard.nn.flop_counter` on one sample (2 FLOPs per multiply-add;
    element-wise work is not counted).

    Returns
    -------
    dict
        ``embed`` (int), ``block``, ``head`` (length L), ``uem`` (length L - 1),
        ``to_exit`` (length L: FLOPs of a step that leaves at exit ``l``: embedding, blocks
        ``0..l``, the UEMs of the candidate exits ``earliest_exit..l`` and head ``l``; the
        last entry charges the UEMs ``earliest_exit..L-2``) and ``full`` (the never-exit
        step: embedding, every block and the last head, no UEM).
    """
    from exitguard.nn.flops import flop_counter

    earliest_exit = model.check_earliest_exit(earliest_exit)
    config = model.config
    reference = next(model.parameters())
    x = torch.zeros((1, *config.image_shape), dtype=reference.dtype, device=reference.device)
    t = torch.zeros(1, dtype=torch.long, device=reference.device)

    def count(fn: Any, *args: Any) -> tuple[int, Any]:
        with flop_counter() as counter:
            out = fn(*args)
        return int(counter.get_total_flops()), out

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            embed, (h, time) = count(model.embed, x, t)
            skips: list[Tensor] = []
            blocks, heads, uems = [], [], []
            for index in range(model.n_exits):
                flops, h = count(model.run_block, index, h, skips)
                blocks.append(flops)
                heads.append(count(model.exits[index], h[:, 1:])[0])
                if index < model.n_exits - 1:
                    uems.append(count(model.uems[index].tokens, h[:, 1:], time)[0])
    finally:
        model.train(was_training)
    last = model.n_exits - 1
    to_exit = []
    for index in range(model.n_exits):
        decided = sum(uems[earliest_exit : min(index, last - 1) + 1])
        to_exit.append(embed + sum(blocks[: index + 1]) + decided + heads[index])
    return {
        "embed": embed,
        "block": blocks,
        "head": heads,
        "uem": uems,
        "to_exit": to_exit,
        "full": embed + sum(blocks) + heads[-1],
        "earliest_exit": earliest_exit,
    }


def describe(config: DenoiserConfig) -> str:
    """A one-line description of the architecture."""
    return (
        f"U-ViT noise predictor: {config.depth} blocks ({config.n_input_blocks} in, 1 middle, "
        f"{config.n_input_blocks} out, long skips), width {config.width}, {config.n_heads} "
        f"heads, patch {config.patch_size} ({config.n_patches} tokens + a time token); an exit "
        f"(norm, linear, 3x3 conv) after every block and a UEM (hidden {config.uem_ratio}x "
        f"width) after every block but the last; T = {config.steps} steps."
    )
