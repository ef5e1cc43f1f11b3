"""Token-level early-exit decoding for a Llama-style causal LM (CALM-style).

The decoder layers are driven directly, with our own key/value cache tensors, so that every
token can leave at its own exit and the layers after it are really skipped:

- Each generated token runs the layers one by one. At every early exit its confidence is
  compared with the threshold; a token leaves at the **first exit whose confidence is >=
  threshold**, else at the last layer (the full model).
- Batches keep per-sequence exits: after an exit, the following layers run only on the rows
  still active.
- The keys and values that skipped layers would have written are filled by **state
  propagation** (CALM): the exited hidden state goes through each skipped layer's input norm
  and key/value projections only (``kv_fill="propagate"``). ``kv_fill="recompute"`` instead runs
  the skipped layers in full for the cache, which costs as much as the full model and is
  offered for comparison. ``kv_fill="defer"`` gives the same exact cache lazily, in the manner
  of FREE's synchronised parallel decoding: a skipped token's missing layers are run only when
  a later token climbs that deep, batched with it (nearly free on a memory-bound CPU or GPU),
  and never when every later token exits early too.
- Confidence measures: ``"learned"`` (CALM's meta classifier, cheap), ``"state"`` (cosine of
  the hidden states before and after the exit's layer, cheap), ``"softmax"`` (top-1
  probability) and ``"margin"`` (top-1 minus top-2), both of which need the vocabulary head at
  every exit tried. The vocabulary head is otherwise evaluated once per token, at the exit
  taken, and every piece of deciding is counted in the cost.

With ``threshold=inf`` (never exit early) the loop reproduces ``model.generate`` token for
token.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from exitguard.policy import ExitPolicy
from exitguard.risk._validation import check_int
from exitguard.risk.exits import check_threshold_vector, check_thresholds
from exitguard.tasks.language.binding import CONFIDENCES, KV_FILLS, LMBinding
from exitguard.tasks.language.cache_fill import CacheFill, ExitedTokens, make_cache_fill
from exitguard.tasks.language.heads import ExitHeads, heads_fingerprint
from exitguard.tasks.language.model import model_fingerprint

Confidence = Literal["learned", "state", "softmax", "margin"]  # binding.CONFIDENCES
KVFill = Literal["propagate", "recompute", "defer"]  # binding.KV_FILLS


def decayed_threshold(threshold: float, *, step: int, decay: float, horizon: int) -> float:
    """CALM's threshold decay over token position: ``threshold * (0.9 + 0.1 exp(-decay t/N))``.

    ``decay = 0`` keeps the threshold constant; larger values relax it along the sequence, so
    that early tokens (which condition everything after them) face the strictest threshold.

    >>> decayed_threshold(0.9, step=0, decay=4.0, horizon=10)
    0.9
    >>> round(decayed_threshold(0.9, step=10, decay=4.0, horizon=10), 4)
    0.8116
    """
    if decay == 0.0 or math.isinf(threshold):
        return threshold
    return threshold * (0.9 + 0.1 * math.exp(-decay * step / max(horizon, 1)))


@dataclasses.dataclass(frozen=True)
class Generation:
    """Result of :meth:`EarlyExitLM.generate`.

    Attributes
    ----------
    tokens : LongTensor of shape (B, T)
        Generated token ids (prompt excluded); ``pad_token_id`` after a sequence's end.
    exits : LongTensor of shape (B, T)
        0-based exit of each token (``n_exits - 1`` = full model), -1 after the end.
    layers : LongTensor of shape (B, T)
        Depth of the exit each token took, in decoder layers (0 after the end).
    lengths : LongTensor of shape (B,)
        Generated tokens per sequence, the end-of-sequence token included.
    cost : Tensor of shape (B,)
        Mean compute per generated token in layer-equivalents (multiply-adds of one decoder
        layer): the layers run, the vocabulary head, exit heads, confidences and cache filling.
    seconds : float
        Wall time of the whole call.
    logits : Tensor of shape (B, T, V) or None
        Logits each token was chosen from (when ``return_logits``).
    cache : (keys, values) or None
        The key/value cache, each of shape (L, B, K, P + T, D) (when ``return_cache``); slot
        ``P + t - 1`` holds generated token ``t`` (the last token is never fed back).
    """

    tokens: torch.Tensor
    exits: torch.Tensor
    layers: torch.Tensor
    lengths: torch.Tensor
    cost: torch.Tensor
    seconds: float
    logits: torch.Tensor | None = None
    cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        batch, steps = self.tokens.shape
        mean_layers = self.layers.sum().item() / max(int(self.lengths.sum()), 1)
        return (
            f"Generation(batch={batch}, tokens={steps}, mean_layers={mean_layers:.2f}, "
            f"mean_cost={self.cost.mean().item():.2f}, seconds={self.seconds:.3f})"
        )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding; x (n, heads, S, D), cos/sin (n, 1, S, D)."""
    return x * cos + _rotate_half(x) * sin


@dataclasses.dataclass(frozen=True)
class DecodingSettings:
    """How :meth:`EarlyExitLM.generate` decodes; checked when constructed.

    Attributes
    ----------
    max_new_tokens : int
        Tokens to generate per sequence (fewer when it ends).
    confidence : {"learned", "state", "softmax", "margin"}
        Confidence measure (see the module docstring).
    decay : float
        CALM's threshold decay rate over token position (0: constant threshold).
    kv_fill : {"propagate", "recompute", "defer"}
        How the cache of skipped layers is filled (see
        :mod:`exitguard.tasks.language.cache_fill`); "recompute" and "defer" give the same
        tokens, "defer" with less compute.
    do_sample, temperature, top_k, seed
        Sampling instead of greedy decoding; ``seed`` seeds a private generator.
    eos_token_id, pad_token_id : int, optional
        End of sequence, and the token written after it (defaults to ``eos_token_id``).
    return_logits, return_cache : bool
        Keep the logits each token was chosen from; keep the key/value cache.
    """

    max_new_tokens: int = 32
    confidence: str = "learned"
    decay: float = 0.0
    kv_fill: str = "propagate"
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    return_logits: bool = False
    return_cache: bool = False

    def __post_init__(self) -> None:
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"`confidence` must be one of {CONFIDENCES}; got {self.confidence!r}.")
        if self.kv_fill not in KV_FILLS:
            raise ValueError(f"`kv_fill` must be one of {KV_FILLS}; got {self.kv_fill!r}.")
        tokens = self.max_new_tokens
        check_int(tokens, "max_new_tokens")
        decay = self.decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)):
            raise ValueError(f"`decay` must be a finite float >= 0; got {decay!r}.")
        if not math.isfinite(decay) or decay < 0:
            raise ValueError(f"`decay` must be a finite float >= 0; got {decay!r}.")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0; got {self.temperature!r}.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise ValueError(f"`top_k` must be a positive integer or None; got {self.top_k!r}.")


class EarlyExitLM:
    """A causal LM with early exits, decoded layer by layer with its own key/value cache.

    Parameters
    ----------
    model : transformers causal LM
        A Llama-style decoder (``model.model.layers``, ``embed_tokens``, ``norm``,
        ``rotary_emb``; attention with ``q/k/v/o_proj``; tied or untied ``lm_head``):
        Llama, SmolLM, Mistral (without sliding window) and Qwen2 qualify.
    heads : ExitHeads or None
        Trained exit heads. Without heads only the full model (``threshold=inf``) can be
        decoded.

    Notes
    -----
    Prompts of different lengths are left-padded; positions follow ``attention_mask`` as in
    ``model.generate``. Attention over the cache is not counted in the layer cost (it is
    small for short sequences next to the projections and the MLP).

    Examples
    --------
    A tiny random Llama with exits after layers 1 and 3 (untrained heads: the logit lens).
    Never exiting reproduces ``model.generate``; threshold 0 leaves every token at the first
    exit, after two layers, except the first, which comes from the prompt's full pass:

    >>> import torch, transformers
    >>> from exitguard.tasks.language.heads import ExitHeads, ExitHeadsConfig
    >>> config = transformers.LlamaConfig(
    ...     vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
    ...     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    >>> _ = torch.manual_seed(0)
    >>> model = transformers.LlamaForCausalLM(config).eval()
    >>> heads = ExitHeads(ExitHeadsConfig(exit_layers=(1, 3), hidden_size=32, rank=4))
    >>> lm = EarlyExitLM(model, heads)
    >>> lm.exit_layers
    (1, 3, 5)
    >>> prompt = torch.tensor([[5, 17, 42, 8]])  # (B=1, P=4)
    >>> full = lm.generate(prompt, max_new_tokens=6)
    >>> reference = model.generate(prompt, max_new_tokens=6, do_sample=False, min_length=0,
    ...                            pad_token_id=0)
    >>> bool((full.tokens == reference[:, 4:]).all())
    True
    >>> fast = lm.generate(prompt, max_new_tokens=6, threshold=0.0, confidence="softmax")
    >>> fast.layers.tolist()
    [[6, 2, 2, 2, 2, 2]]
    """

    def __init__(self, model: Any, heads: ExitHeads | None = None) -> None:
        inner = model.model
        config = model.config
        self.model = model
        self.heads = heads
        self.embed: nn.Embedding = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm: nn.Module = inner.norm
        self.rotary: nn.Module = inner.rotary_emb
        self.lm_head: nn.Linear = model.get_output_embeddings()
        self.n_layers = len(self.layers)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.scale = self.head_dim**-0.5
        if heads is not None:
            if heads.config.hidden_size != self.hidden_size:
                raise ValueError(
                    f"`heads` have hidden size {heads.config.hidden_size}; the model has "
                    f"{self.hidden_size}."
                )
            if heads.config.exit_layers[-1] >= self.n_layers - 1:
                raise ValueError(
                    f"`heads` exit after layer {heads.config.exit_layers[-1]}; early exits must "
                    f"sit before the last layer ({self.n_layers - 1})."
                )
        early = heads.config.exit_layers if heads is not None else ()
        self.exit_layers: tuple[int, ...] = (*early, self.n_layers - 1)
        self._exit_at = {layer: e for e, layer in enumerate(early)}
        self._build_propagation()
        self._build_costs()

    # ------------------------------------------------------------------ set-up

    @property
    def n_exits(self) -> int:
        """Number of exits, the final one (the full model) included."""
        return len(self.exit_layers)

    def binding(self, *, decay: float = 0.0, kv_fill: str = "propagate") -> LMBinding:
        """What a policy calibrated on this model's decoding must record (see :meth:`bind_policy`).

        The model and heads fingerprints are computed once per ``EarlyExitLM`` (change the
        weights in place and build a new one).
        """
        cached = self.__dict__.get("_fingerprints")
        if cached is None:
            cached = (model_fingerprint(self.model), heads_fingerprint(self.heads))
            self.__dict__["_fingerprints"] = cached
        return LMBinding.create(
            model=cached[0],
            heads=cached[1],
            exit_layers=self.exit_layers,
            decay=decay,
            kv_fill=kv_fill,
        )

    def bind_policy(
        self,
        policy: ExitPolicy,
        *,
        confidence: str,
        decay: float = 0.0,
        kv_fill: str = "propagate",
    ) -> ExitPolicy:
        """A copy of ``policy`` that records this model, these heads and the decoding.

        Give the confidence, decay and cache mode of the sweep the policy was calibrated on
        (``exitguard lm sweep`` records them in its table, and ``exitguard calibrate`` copies
        them; see :func:`~exitguard.tasks.language.binding.policy_fields_from_table`).
        """
        if not isinstance(policy, ExitPolicy):
            raise TypeError(f"`policy` must be an ExitPolicy; got {type(policy).__name__}.")
        if confidence not in CONFIDENCES:
            raise ValueError(f"`confidence` must be one of {CONFIDENCES}; got {confidence!r}.")
        self.check_policy(
            policy, confidence=confidence, decay=decay, kv_fill=kv_fill, allow_unbound=True
        )
        binding = self.binding(decay=decay, kv_fill=kv_fill)
        return policy.with_model(
            n_exits=self.n_exits, model_fingerprint=binding.fingerprint(), confidence=confidence
        )

    def check_policy(
        self,
        policy: ExitPolicy,
        *,
        confidence: str,
        decay: float = 0.0,
        kv_fill: str = "propagate",
        allow_unbound: bool = False,
    ) -> float | tuple[float, ...]:
        """The threshold of ``policy``, after checking that it belongs to this decoding.

        Returns the scalar threshold, or for a policy with a threshold vector or function the
        threshold of every exit but the last (``n_exits - 1`` floats).

        A policy bound by :meth:`bind_policy` must record this model, these heads (their
        configuration and weights), these exit layers, and the given confidence measure,
        threshold decay and cache mode. A policy for another kind of model (a vision
        network's) is refused; one that records no model is refused unless
        ``allow_unbound``, in which case whatever it does record is still checked.

        Raises
        ------
        ValueError
            With one line naming what differs and how to fix it.
        """
        if not isinstance(policy, ExitPolicy):
            raise TypeError(f"`policy` must be an ExitPolicy; got {type(policy).__name__}.")
        recorded = LMBinding.parse(policy.model_fingerprint)
        if recorded is None and policy.model_fingerprint is not None:
            raise ValueError(
                "`policy` was calibrated for another kind of model (fingerprint "
                f"{policy.model_fingerprint!r}, {policy.n_exits} exits, confidence "
                f"{policy.confidence!r}), not for a language model with exit heads; calibrate "
                "on an `exitguard lm sweep` table."
            )
        if recorded is None and not allow_unbound:
            raise ValueError(
                "`policy` does not record the language model, exit heads and decoding it was "
                "calibrated for, so it cannot be checked against them; calibrate it from an "
                "`exitguard lm sweep` table (which records them), bind it with "
                "`lm.bind_policy(policy, confidence=..., decay=..., kv_fill=...)` using the "
                "sweep's settings, or pass `allow_unbound=True` to apply it unchecked."
            )
        if recorded is not None:
            found = recorded.differences(self.binding(decay=decay, kv_fill=kv_fill))
            if found:
                raise ValueError(
                    f"`policy` belongs to another decoding: {'; '.join(found)}. Its guarantee "
                    "holds only for the model, heads and settings of its sweep; decode with "
                    "those or sweep and calibrate again."
                )
        if policy.n_exits is not None and policy.n_exits != self.n_exits:
            raise ValueError(
                f"`policy` was calibrated for {policy.n_exits} exits; this model with its heads "
                f"has {self.n_exits}."
            )
        if (policy.confidence is not None or recorded is not None) and (
            policy.confidence != confidence
        ):
            raise ValueError(
                f"`policy` thresholds the confidence {policy.confidence!r}; this decoding uses "
                f"{confidence!r}. Use the policy's confidence or recalibrate."
            )
        if policy.kind != "scalar":
            return tuple(float(t) for t in policy.exit_thresholds(self.n_exits))
        if policy.threshold is None:
            raise ValueError("`policy` has no threshold (its calibration table had no grid).")
        return float(policy.threshold)

    def _build_propagation(self) -> None:
        """Fold every layer's input-norm weight into its key/value projections, stacked.

        ``k_l = k_proj(norm_l(h)) = (h / rms(h)) @ (diag(w_l) W_k^T) + b``, so the keys and values
        of all skipped layers come from one batched matmul of the exited state.
        """
        weights, biases = [], []
        for layer in self.layers:
            attn, norm = layer.self_attn, layer.input_layernorm
            w = norm.weight.detach()  # (H,)
            kv = torch.cat([attn.k_proj.weight, attn.v_proj.weight], dim=0).detach()  # (2KD, H)
            weights.append((kv * w[None, :]).T.contiguous())  # (H, 2KD)
            bias = [p.bias for p in (attn.k_proj, attn.v_proj)]
            biases.append(
                torch.cat([b.detach() for b in bias])
                if bias[0] is not None
                else torch.zeros(kv.shape[0], dtype=kv.dtype, device=kv.device)
            )
        self._kv_weight = torch.stack(weights)  # (L, H, 2KD)
        self._kv_bias = torch.stack(biases)  # (L, 2KD)
        first_norm = self.layers[0].input_layernorm
        eps = getattr(first_norm, "variance_epsilon", None)
        self._norm_eps = float(eps if eps is not None else getattr(first_norm, "eps", 1e-6))

    def _build_costs(self) -> None:
        """Costs in layer-equivalents: multiply-adds per token relative to one decoder layer."""
        hidden, kv, q = self.hidden_size, self.n_kv * self.head_dim, self.n_heads * self.head_dim
        intermediate = self.layers[0].mlp.down_proj.weight.shape[1]
        layer_macs = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * intermediate
        self.layer_macs = int(layer_macs)
        self.cost_lm_head = self.vocab_size * hidden / layer_macs
        self.cost_propagate = 2 * hidden * kv / layer_macs  # per skipped layer
        if self.heads is not None:
            macs = self.heads.macs_per_token()
            self.cost_adapter = macs["adapter"] / layer_macs
            self.cost_learned = macs["confidence"] / layer_macs
        else:
            self.cost_adapter = self.cost_learned = 0.0
        self.cost_state = 3 * hidden / layer_macs

    # ------------------------------------------------------------------ layers

    def _layer(
        self,
        index: int,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        rows: torch.Tensor | None,
        start: int,
        *,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decoder layer on ``h`` (n, S, H) at cache slots ``start .. start+S-1``.

        ``mask`` (n, 1, S, T) is True where a query may attend; ``cache`` holds this layer's
        keys and values (B, K, T_max, D); ``rows`` (n,) picks the batch rows of ``h`` (None: all).
        ``slots`` (n,) gives each single-position item its own cache slot (at most ``start``;
        ``rows`` is then required). Without a cache, attention is over the S positions of ``h``.
        """
        layer = self.layers[index]
        attn = layer.self_attn
        n, seq, _ = h.shape
        x = layer.input_layernorm(h)  # (n, S, H)
        q = (
            attn.q_proj(x).view(n, seq, self.n_heads, self.head_dim).transpose(1, 2)
        )  # (n, nh, S, D)
        k = attn.k_proj(x).view(n, seq, self.n_kv, self.head_dim).transpose(1, 2)  # (n, K, S, D)
        v = attn.v_proj(x).view(n, seq, self.n_kv, self.head_dim).transpose(1, 2)  # (n, K, S, D)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if cache is not None:
            keys, values = cache
            end = start + seq
            if slots is not None:
                keys[rows, :, slots] = k[:, :, 0]
                values[rows, :, slots] = v[:, :, 0]
                k, v = keys[rows, :, :end], values[rows, :, :end]  # (n, K, T, D)
            elif rows is None:
                keys[:, :, start:end] = k
                values[:, :, start:end] = v
                k, v = keys[:, :, :end], values[:, :, :end]  # (n, K, T, D)
            else:
                keys[rows, :, start:end] = k
                values[rows, :, start:end] = v
                k, v = keys[rows, :, :end], values[rows, :, :end]  # (n, K, T, D)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.n_kv != self.n_heads
        )  # (n, nh, S, D)
        out = out.transpose(1, 2).reshape(n, seq, self.n_heads * self.head_dim)  # (n, S, nh*D)
        h = h + attn.o_proj(out)  # (n, S, H)
        return h + layer.mlp(layer.post_attention_layernorm(h))  # (n, S, H)

    def _propagate(
        self,
        first: int,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        rows: torch.Tensor,
        slot: int,
    ) -> None:
        """Fill the cache of layers ``first ..`` for ``rows`` from their exited state h (m, H)."""
        if first >= self.n_layers or rows.numel() == 0:
            return
        m = h.shape[0]
        x = h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + self._norm_eps)
        kv = torch.einsum("mh,lhd->lmd", x.to(h.dtype), self._kv_weight[first:])  # (Ls, m, 2KD)
        kv = kv + self._kv_bias[first:, None, :]
        kv = kv.view(-1, m, 2, self.n_kv, self.head_dim)  # (Ls, m, 2, K, D)
        k = kv[:, :, 0] * cos[:, 0] + _rotate_half(kv[:, :, 0]) * sin[:, 0]  # (Ls, m, K, D)
        cache_k[first:, rows, :, slot] = k
        cache_v[first:, rows, :, slot] = kv[:, :, 1]

    def _rope_tables(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cos, sin = self.rotary(h, positions)  # (n, S, D) each
        return cos[:, None], sin[:, None]  # (n, 1, S, D)

    def _exit_logits(self, exit_: int, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits at exit ``exit_`` for states (n, H)."""
        if exit_ == self.n_exits - 1:
            return self.lm_head(self.norm(h))  # (n, V)
        return self.lm_head(self._early_heads().transform(exit_, h))  # (n, V)

    def _early_heads(self) -> ExitHeads:
        if self.heads is None:
            raise RuntimeError("early exits need heads; this decoder has none.")
        return self.heads

    # ------------------------------------------------------------------ forward (no cache)

    @torch.no_grad()
    def hidden_states(
        self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Hidden states after every decoder layer for a batch of sequences, no cache.

        Returns a list of L tensors of shape (B, S, H), before the final norm.
        """
        valid = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.bool()
        )
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
        h = self.embed(input_ids)  # (B, S, H)
        cos, sin = self._rope_tables(h, positions)
        mask = self._prefill_mask(valid)  # (B, 1, S, S)
        states = []
        for index in range(self.n_layers):
            h = self._layer(index, h, cos, sin, mask, None, None, 0)
            states.append(h)
        return states

    @staticmethod
    def _prefill_mask(valid: torch.Tensor) -> torch.Tensor:
        seq = valid.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=valid.device).tril()  # (S, S)
        eye = torch.eye(seq, dtype=torch.bool, device=valid.device)  # (S, S)
        # Padding keys are hidden; a padding query sees itself (avoids an all-masked row).
        return ((causal & valid[:, None, :]) | eye)[:, None]  # (B, 1, S, S)

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        threshold: float | torch.Tensor | ExitPolicy = math.inf,
        settings: DecodingSettings | None = None,
        allow_unbound: bool = False,
        **overrides: Any,
    ) -> Generation:
        """Generate with token-level early exits.

        Parameters
        ----------
        input_ids : LongTensor of shape (B, P)
            Prompts, left-padded when their lengths differ.
        attention_mask : tensor of shape (B, P), optional
            1 for real tokens, 0 for left padding.
        max_new_tokens : int
            Tokens to generate per sequence (fewer when it ends).
        threshold : float, tensor of shape (R,) or (R, L - 1), or ExitPolicy
            Exit at the first exit whose confidence is >= threshold; ``inf`` never exits early.
            A calibrated :class:`~exitguard.ExitPolicy` stands for its threshold (or its
            threshold vector), after :meth:`check_policy` (with this call's confidence, decay
            and kv_fill). A grid of R thresholds decodes every prompt under each of them in
            one batch of R * B rows (row ``r * B + b``: prompt ``b`` under ``threshold[r]``),
            sharing the prompts' prefill; (R, L - 1) is a grid of R threshold vectors, one
            threshold per exit but the last (``inf`` disables an exit: its confidence is not
            computed). CALM's decay over token position scales every exit's threshold.
        settings : DecodingSettings, optional
            How to decode (length, confidence, threshold decay, cache fill, sampling, what
            to return); see :class:`DecodingSettings`. Its fields may also be given as
            keyword arguments (``max_new_tokens=8, kv_fill="defer"``), which override it.
        allow_unbound : bool
            Accept a policy that records no model (see :meth:`check_policy`).

        Returns
        -------
        Generation
        """
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                "`input_ids` must have shape (batch, prompt_length >= 1); "
                f"got {tuple(input_ids.shape)}."
            )
        settings = dataclasses.replace(settings or DecodingSettings(), **overrides)
        max_new_tokens, confidence = settings.max_new_tokens, settings.confidence
        decay, kv_fill = settings.decay, settings.kv_fill
        if isinstance(threshold, ExitPolicy):
            threshold = self.check_policy(
                threshold,
                confidence=confidence,
                decay=decay,
                kv_fill=kv_fill,
                allow_unbound=allow_unbound,
            )
        if isinstance(threshold, tuple):  # a policy's threshold vector
            threshold = torch.tensor([threshold], dtype=torch.float64)  # (1, L-1)
        if isinstance(threshold, torch.Tensor):
            threshold = threshold.detach().cpu().numpy()
        values = check_thresholds(threshold)  # the core's check
        if values.size == 0:
            raise ValueError("`threshold` must hold at least one threshold; got an empty grid.")
        if values.ndim == 2:
            check_threshold_vector(values[0], self.n_exits, name="threshold")  # (L-1,) each row
            grid = torch.from_numpy(values.copy())  # (R, L-1) one vector per grid row
        elif values.ndim <= 1:
            grid = torch.from_numpy(values.reshape(-1, 1).copy())  # (R, 1) scalar thresholds
        else:
            raise ValueError(
                "`threshold` must be a float, a grid (R,) or threshold vectors (R, n_exits - 1); "
                f"got shape {values.shape}."
            )
        grid = grid.expand(-1, max(self.n_exits - 1, 1))  # (R, L-1)
        early_exits = bool(torch.isfinite(grid).any()) and self.n_exits > 1
        if bool(torch.isfinite(grid).any()) and self.heads is None:
            raise ValueError("a finite `threshold` needs exit heads; pass `heads=` (train-exits).")
        eos = settings.eos_token_id
        pad = settings.pad_token_id if settings.pad_token_id is not None else eos
        pad = 0 if pad is None else pad
        generator = None
        if settings.do_sample:
            generator = torch.Generator(device=input_ids.device)
            generator.manual_seed(0 if settings.seed is None else int(settings.seed))

        start_time = time.perf_counter()
        device = input_ids.device
        prompts, prompt_len = input_ids.shape
        repeats = grid.shape[0]
        batch = prompts * repeats  # row r * prompts + b: prompt b under threshold r
        total = prompt_len + max_new_tokens
        row_threshold = grid.repeat_interleave(prompts, dim=0).to(device)  # (B, L-1)
        valid = torch.zeros(prompts, total, dtype=torch.bool, device=device)  # (b, T)
        valid[:, :prompt_len] = True if attention_mask is None else attention_mask.bool().to(device)
        dtype = self.embed.weight.dtype
        shape = (self.n_layers, prompts, self.n_kv, total, self.head_dim)
        cache_k = torch.zeros(shape, dtype=dtype, device=device)  # (L, b, K, T, D)
        cache_v = torch.zeros(shape, dtype=dtype, device=device)  # (L, b, K, T, D)

        books = _Books(
            tokens=torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device),
            exits=torch.full((batch, max_new_tokens), -1, dtype=torch.long, device=device),
            layers=torch.zeros((batch, max_new_tokens), dtype=torch.long, device=device),
            cost=torch.zeros(batch, dtype=torch.float64, device=device),
            logits=(
                torch.zeros(batch, max_new_tokens, self.vocab_size, device=device)
                if settings.return_logits
                else None
            ),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
            lengths=torch.zeros(batch, dtype=torch.long, device=device),
            eos_token_id=eos,
            do_sample=settings.do_sample,
            temperature=settings.temperature,
            top_k=settings.top_k,
            generator=generator,
        )

        # Prefill (once per prompt, shared by the grid): every prompt position through every
        # layer; the first new token is the full model's.
        positions = (valid[:, :prompt_len].long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
        h = self.embed(input_ids)  # (B, P, H)
        cos, sin = self._rope_tables(h, positions)
        mask = self._prefill_mask(valid[:, :prompt_len])  # (B, 1, P, P)
        for index in range(self.n_layers):
            h = self._layer(index, h, cos, sin, mask, (cache_k[index], cache_v[index]), None, 0)
        logits = self.lm_head(self.norm(h[:, -1])).repeat(repeats, 1)  # (B, V)
        if repeats > 1:
            cache_k = cache_k.repeat(1, repeats, 1, 1, 1)  # (L, B, K, T, D)
            cache_v = cache_v.repeat(1, repeats, 1, 1, 1)  # (L, B, K, T, D)
            valid = valid.repeat(repeats, 1)  # (B, T)
        next_position = valid[:, :prompt_len].sum(-1)  # (B,) position of the next new token
        self._emit(
            0,
            torch.arange(batch, device=device),
            logits,
            self.n_exits - 1,
            torch.full((batch,), self.n_layers + self.cost_lm_head, dtype=torch.float64),
            books,
        )
        fill = make_cache_fill(
            kv_fill, batch=batch, total=total, width=self.hidden_size, n_layers=self.n_layers,
            like=h,
        )  # fmt: skip

        for step in range(1, max_new_tokens):
            if bool(books.finished.all()):
                break
            slot = prompt_len + step - 1  # cache slot of the token fed in
            rows = (~books.finished).nonzero().squeeze(-1)  # (n,)
            valid[rows, slot] = True
            fed = books.tokens[rows, step - 1]  # (n,)
            pos = next_position[rows]  # (n,)
            next_position[rows] += 1
            thr = (
                row_threshold
                * decayed_threshold(1.0, step=step, decay=decay, horizon=max_new_tokens)
                if early_exits
                else None
            )  # (B, L-1) or None
            inputs = _StepInputs(slot, rows, fed, pos, valid, (cache_k, cache_v), thr)
            self._decode_step(step, inputs, fill, confidence, books)

        return Generation(
            tokens=books.tokens,
            exits=books.exits,
            layers=books.layers,
            lengths=books.lengths,
            cost=books.cost / books.lengths.clamp(min=1),
            seconds=time.perf_counter() - start_time,
            logits=books.logits,
            cache=(cache_k, cache_v) if settings.return_cache else None,
        )

    def _decode_step(
        self, step: int, inputs: _StepInputs, fill: CacheFill, confidence: str, books: _Books
    ) -> None:
        """One new token for every row in ``inputs.rows``, each leaving at its own exit.

        The work of a layer is a list of *items*: the new token of every row still climbing
        and, for a cache fill that catches skipped layers up later (``Defer``), earlier tokens
        of those rows whose deeper layers were skipped and are now needed by the new token.
        """
        slot, rows, valid, threshold = inputs.slot, inputs.rows, inputs.valid, inputs.threshold
        cache_k, cache_v = inputs.cache
        batch = valid.shape[0]
        device = valid.device
        item_rows = rows  # (n,) batch row of each item
        item_slots: torch.Tensor | None = None  # (n,) cache slot of each item; None: all `slot`
        current = torch.ones(rows.numel(), dtype=torch.bool, device=device)  # (n,) new tokens
        subset: torch.Tensor | None = None if rows.numel() == batch else rows
        h = self.embed(inputs.fed)[:, None]  # (n, 1, H)
        cos, sin = self._rope_tables(h, inputs.pos[:, None])  # (n, 1, 1, D)
        mask = valid[rows, None, None, : slot + 1]  # (n, 1, 1, T)
        cost = torch.zeros(batch, dtype=torch.float64, device=device)  # this step's compute
        done = torch.zeros(batch, dtype=torch.bool, device=device)  # row's token decided
        decided: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (rows, logits, exit)
        finite = torch.isfinite(threshold) if threshold is not None else None  # (B, L-1)
        fill.begin_step(rows, slot, inputs.pos)
        for index in range(self.n_layers):
            joining = fill.joining(index, item_rows[current & ~done[item_rows]], slot)
            if joining is not None:  # earlier tokens whose next missing layer is this one
                j_rows, j_slots, j_state, j_pos = joining
                j_h = j_state[:, None]  # (j, 1, H)
                j_cos, j_sin = self._rope_tables(j_h, j_pos[:, None])
                causal = torch.arange(slot + 1, device=device)[None, :] <= j_slots[:, None]
                j_mask = (valid[j_rows, : slot + 1] & causal)[:, None, None]  # (j, 1, 1, T)
                if item_slots is None:
                    item_slots = torch.full_like(item_rows, slot)
                item_rows = torch.cat([item_rows, j_rows])
                item_slots = torch.cat([item_slots, j_slots])
                current = torch.cat([current, torch.zeros_like(j_rows, dtype=torch.bool)])
                h, cos, sin = torch.cat([h, j_h]), torch.cat([cos, j_cos]), torch.cat([sin, j_sin])
                mask = torch.cat([mask, j_mask])
                subset = item_rows
            previous = h
            h = self._layer(
                index, h, cos, sin, mask, (cache_k[index], cache_v[index]), subset, slot,
                slots=item_slots,
            )  # fmt: skip
            cost.index_add_(0, item_rows, torch.ones_like(item_rows, dtype=torch.float64))
            exit_ = self._exit_at.get(index)
            if exit_ is None or threshold is None:
                continue
            # Early exit `exit_`: score the new tokens not decided yet whose threshold at this
            # exit is finite (a disabled exit computes no confidence).
            undecided = current & ~done[item_rows] & finite[item_rows, exit_]  # type: ignore[index]
            if not bool(undecided.any()):
                continue
            candidates = item_rows[undecided]  # (c,)
            state = h[undecided, 0]  # (c, H)
            logits = normed = None
            if confidence == "learned":
                heads = self._early_heads()
                normed = heads.transform(exit_, state)  # (c, H)
                score = torch.sigmoid(heads.confidence_logit(exit_, normed))  # (c,)
                cost[candidates] += self.cost_learned + self.cost_adapter
            elif confidence == "state":
                score = F.cosine_similarity(state, previous[undecided, 0], dim=-1).clamp(0, 1)
                cost[candidates] += self.cost_state
            else:
                logits = self._exit_logits(exit_, state)  # (c, V)
                probs = torch.softmax(logits.float(), dim=-1)  # (c, V)
                top = probs.topk(2, dim=-1).values  # (c, 2)
                score = top[:, 0] if confidence == "softmax" else top[:, 0] - top[:, 1]
                cost[candidates] += self.cost_lm_head + self.cost_adapter
            fire = score >= threshold[candidates, exit_]  # (c,) the exit rule at this exit
            if not bool(fire.any()):
                continue
            leaving = candidates[fire]  # (m,)
            if normed is not None:
                logits = self.lm_head(normed[fire])  # (m, V)
                cost[leaving] += self.cost_lm_head
            elif logits is None:
                logits = self._exit_logits(exit_, state[fire])  # (m, V)
                cost[leaving] += self.cost_lm_head + self.cost_adapter
            else:
                logits = logits[fire]
            decided.append((leaving, logits, exit_))
            done[leaving] = True
            if fill.keeps_climbing:
                continue  # the leaving rows keep climbing, to fill the cache exactly
            fired = undecided.nonzero().squeeze(-1)[fire]  # (m,) item indices
            left = ExitedTokens(index, leaving, slot, state[fire], cos[fired], sin[fired])
            fill.exited(self, left, (cache_k, cache_v), cost)
            stop = done[item_rows]  # (n,) every item of a row whose token is decided stops
            stop_slots = (
                item_slots[stop]
                if item_slots is not None
                else torch.full_like(item_rows[stop], slot)
            )
            fill.stopped(item_rows[stop], stop_slots, h[stop, 0], index + 1)
            keep = ~stop
            item_rows, current = item_rows[keep], current[keep]
            item_slots = item_slots[keep] if item_slots is not None else None
            h, cos, sin, mask = h[keep], cos[keep], sin[keep], mask[keep]
            subset = item_rows
            if item_rows.numel() == 0:
                break
        if item_slots is not None:
            finished_items = ~current  # caught-up tokens that reached the last layer
            fill.stopped(item_rows[finished_items], item_slots[finished_items], None, self.n_layers)
        last = current & ~done[item_rows]  # new tokens that reached the last layer undecided
        if bool(last.any()):
            logits = self._exit_logits(self.n_exits - 1, h[last, 0])  # (r, V)
            cost[item_rows[last]] += self.cost_lm_head
            decided.append((item_rows[last], logits, self.n_exits - 1))
        for leaving, logits, exit_ in decided:
            self._emit(step, leaving, logits, exit_, cost[leaving], books)

    def _emit(
        self,
        step: int,
        rows: torch.Tensor,
        logits: torch.Tensor,
        exit_: int,
        step_cost: torch.Tensor,
        books: _Books,
    ) -> None:
        """Choose the next token of ``rows`` from ``logits`` (m, V) and record the books."""
        if books.do_sample:
            scores = logits.float() / books.temperature  # (m, V)
            if books.top_k is not None and books.top_k < scores.shape[-1]:
                kth = scores.topk(books.top_k, dim=-1).values[:, -1:]  # (m, 1)
                scores = scores.masked_fill(scores < kth, -math.inf)
            probs = torch.softmax(scores, dim=-1)  # (m, V)
            chosen = torch.multinomial(probs, 1, generator=books.generator).squeeze(-1)  # (m,)
        else:
            chosen = logits.argmax(dim=-1)  # (m,)
        books.tokens[rows, step] = chosen
        books.exits[rows, step] = exit_
        books.layers[rows, step] = self.exit_layers[exit_] + 1
        books.cost[rows] += step_cost.to(books.cost.device)
        books.lengths[rows] += 1
        if books.logits is not None:
            books.logits[rows, step] = logits.float()
        if books.eos_token_id is not None:
            books.finished[rows] |= chosen == books.eos_token_id


@dataclasses.dataclass
class _Books:
    """What :meth:`EarlyExitLM.generate` records, and its sampling settings (internal)."""

    tokens: torch.Tensor  # (B, T)
    exits: torch.Tensor  # (B, T)
    layers: torch.Tensor  # (B, T)
    cost: torch.Tensor  # (B,)
    logits: torch.Tensor | None  # (B, T, V)
    finished: torch.Tensor  # (B,)
    lengths: torch.Tensor  # (B,)
    eos_token_id: int | None
    do_sample: bool
    temperature: float
    top_k: int | None
    generator: torch.Generator | None


@dataclasses.dataclass(frozen=True)
class _StepInputs:
    """What one decoding step reads (internal): the tokens fed in and where they go."""

    slot: int  # cache slot of the tokens fed in
    rows: torch.Tensor  # (n,) batch rows still generating
    fed: torch.Tensor  # (n,) the tokens fed in
    pos: torch.Tensor  # (n,) their positions
    valid: torch.Tensor  # (B, T) cache slots that hold a token
    cache: tuple[torch.Tensor, torch.Tensor]  # (L, B, K, T, D) keys and values
    threshold: torch.Tensor | None  # (B, L-1) each row's thresholds at this step; None: never
