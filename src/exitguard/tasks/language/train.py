"""Training exit heads by self-distillation from the last layer, and CALM's learned confidence.

1. Features: random windows of a tokenised corpus go through the frozen model once; the states
   at every early exit and the last layer's top-k next-token distribution are kept.
2. Distillation: every exit head minimises KL(p_last || p_exit) on next-token distributions.
   To keep a 49k-token vocabulary affordable on a CPU, the KL is taken over the union of the
   teacher's top-k tokens in the minibatch (a sampled softmax: the student is normalised over
   that candidate set, the teacher over its own top-k), which holds nearly all the teacher's mass.
3. Confidence: with the heads frozen, each exit's full-vocabulary top-1 is compared with the
   last layer's; a small MLP per exit learns to predict that agreement (binary cross-entropy).

Everything is seeded; the result is cached under :func:`~exitguard.tasks.language.model.cache_dir`
keyed by a fingerprint of the model, the corpus and the settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from exitguard.risk._validation import check_ints
from exitguard.tasks.language.decode import EarlyExitLM
from exitguard.tasks.language.heads import (
    ExitHeads,
    ExitHeadsConfig,
    HeadsFileError,
    default_exit_layers,
    read_heads_meta,
)
from exitguard.tasks.language.model import cache_dir, model_fingerprint


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train_exit_heads`.

    Attributes
    ----------
    n_tokens : int
        Training tokens (windows of ``window`` tokens drawn from the corpus).
    window : int
        Length of each training window.
    top_k : int
        Teacher tokens kept per position for the distillation.
    epochs, batch_tokens, lr : int, int, float
        Optimisation of the heads (AdamW, cosine schedule).
    confidence_tokens : int
        Tokens used to fit the learned confidence (a full-vocabulary pass per exit).
    confidence_epochs : int
        Epochs of the confidence heads.
    holdout : float
        Share of windows held out to report agreement and confidence accuracy.
    generated : int
        When > 0, the last ``generated`` tokens of every window are the model's own greedy
        continuation of the corpus text before them, so that heads and confidences also learn
        the text they will meet when decoding (0: corpus text only).
    seed : int
        Seeds the windows, the initialisation and the minibatches.
    """

    n_tokens: int = 49152
    window: int = 128
    top_k: int = 32
    epochs: int = 4
    batch_tokens: int = 512
    lr: float = 3e-3
    confidence_tokens: int = 24576
    confidence_epochs: int = 30
    holdout: float = 0.125
    generated: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check_ints(
            self, ("n_tokens", "window", "top_k", "epochs", "batch_tokens", "confidence_tokens")
        )
        if isinstance(self.generated, bool) or not 0 <= self.generated < self.window:
            raise ValueError(
                f"`generated` must be an integer in [0, window); got {self.generated!r}."
            )
        if not (0.0 <= self.holdout < 1.0):
            raise ValueError(f"`holdout` must be a float in [0, 1); got {self.holdout!r}.")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0; got {self.lr!r}.")


@dataclasses.dataclass(frozen=True)
class TrainReport:
    """What training achieved, measured on the held-out windows.

    Attributes
    ----------
    exit_layers : tuple of int
        Early exits' layers (0-based).
    agreement_before, agreement_after : tuple of float
        Share of held-out tokens whose top-1 at each early exit equals the last layer's, with the
        untrained head (logit lens) and with the trained head.
    confidence_accuracy : tuple of float
        Accuracy of each exit's learned confidence at predicting that agreement (cut at 0.5).
    seconds : float
        Wall time.
    """

    exit_layers: tuple[int, ...]
    agreement_before: tuple[float, ...]
    agreement_after: tuple[float, ...]
    confidence_accuracy: tuple[float, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


def sample_windows(
    token_ids: torch.Tensor, *, n_windows: int, window: int, seed: int
) -> torch.Tensor:
    """``n_windows`` windows of ``window + 1`` consecutive tokens, drawn without overlap.

    Returns a LongTensor of shape (n_windows, window + 1), or fewer rows if the corpus is short.
    """
    span = window + 1
    available = token_ids.numel() // span
    if available < 2:
        raise ValueError(
            f"the corpus has {token_ids.numel()} tokens: too few for windows of {span}."
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(available, generator=generator)[:n_windows]  # (N,)
    starts = order * span  # (N,)
    return token_ids[starts[:, None] + torch.arange(span)[None, :]]  # (N, span)


def _continue_windows(
    lm: EarlyExitLM, windows: torch.Tensor, *, generated: int, progress: bool
) -> torch.Tensor:
    """Replace the last ``generated`` tokens of every window by the model's greedy continuation."""
    from tqdm.auto import tqdm

    prefix = windows[:, : windows.shape[1] - generated]  # (N, S - g)
    out = []
    for chunk in tqdm(prefix.split(32), desc="self-generated text", disable=not progress):
        continuation = lm.generate(chunk, max_new_tokens=generated).tokens  # (b, g)
        out.append(torch.cat([chunk, continuation], dim=1))  # (b, S)
    return torch.cat(out)


@torch.no_grad()
def _features(
    lm: EarlyExitLM, windows: torch.Tensor, *, top_k: int, progress: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exit states (E, N, H), and the last layer's top-k log-probs and token ids (N, k)."""
    from tqdm.auto import tqdm

    exit_layers = lm.exit_layers[:-1]
    states, log_probs, ids = [], [], []
    batch = max(1, 2048 // windows.shape[1])
    for start in tqdm(
        range(0, windows.shape[0], batch), desc="exit features", disable=not progress
    ):
        chunk = windows[start : start + batch, :-1]  # (b, S)
        hidden = lm.hidden_states(chunk)  # L x (b, S, H)
        final = lm.norm(hidden[-1]).flatten(0, 1)  # (b*S, H)
        teacher = torch.log_softmax(lm.lm_head(final).float(), dim=-1)  # (b*S, V)
        top = teacher.topk(top_k, dim=-1)
        states.append(torch.stack([hidden[layer].flatten(0, 1) for layer in exit_layers]))
        log_probs.append(top.values)
        ids.append(top.indices)
    return (
        torch.cat(states, dim=1),  # (E, N, H)
        torch.cat(log_probs),  # (N, k)
        torch.cat(ids),  # (N, k)
    )


@torch.inference_mode()
def _top1(lm: EarlyExitLM, heads: ExitHeads, exit_: int, states: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary top-1 token at an early exit, in chunks; states (N, H) -> (N,)."""
    out = []
    for chunk in states.split(1024):
        out.append(lm.lm_head(heads.transform(exit_, chunk)).argmax(-1))
    return torch.cat(out)


def train_exit_heads(
    model: Any,
    token_ids: torch.Tensor,
    *,
    exit_layers: tuple[int, ...] | None = None,
    rank: int = 32,
    confidence_width: int = 64,
    config: TrainConfig | None = None,
    progress: bool = True,
) -> tuple[ExitHeads, TrainReport]:
    """Train exit heads and learned confidences on a tokenised corpus.

    Parameters
    ----------
    model : transformers causal LM
        A Llama-style decoder; it stays frozen.
    token_ids : LongTensor of shape (T,)
        The tokenised corpus.
    exit_layers : tuple of int, optional
        0-based layers after which exits sit; default every third layer.
    rank, confidence_width : int
        Head sizes (see :class:`ExitHeadsConfig`).
    config : TrainConfig, optional
        Optimisation settings; defaults to ``TrainConfig()``.
    progress : bool
        Show progress bars.

    Returns
    -------
    heads : ExitHeads
        Trained heads in eval mode.
    report : TrainReport
        Held-out agreement before/after training and confidence accuracy.
    """
    import time

    from tqdm.auto import tqdm

    config = config if config is not None else TrainConfig()
    started = time.perf_counter()
    n_layers = len(model.model.layers)
    layers = exit_layers if exit_layers is not None else default_exit_layers(n_layers)
    heads_config = ExitHeadsConfig(
        exit_layers=tuple(layers),
        hidden_size=int(model.config.hidden_size),
        rank=rank,
        confidence_width=confidence_width,
        eps=float(getattr(model.config, "rms_norm_eps", 1e-6)),
        model_fingerprint=model_fingerprint(model),
    )
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):  # seeds the initialisation, leaves the global RNG
        torch.manual_seed(config.seed)
        heads = ExitHeads(heads_config, final_norm_weight=model.model.norm.weight)
    lm = EarlyExitLM(model, heads)

    n_windows = max(2, math.ceil(config.n_tokens / config.window))
    windows = sample_windows(
        token_ids.reshape(-1), n_windows=n_windows, window=config.window, seed=config.seed
    )
    if config.generated:
        windows = _continue_windows(lm, windows, generated=config.generated, progress=progress)
    n_hold = max(1, round(config.holdout * windows.shape[0])) if config.holdout else 0
    n_fit = windows.shape[0] - n_hold
    states, teacher_lp, teacher_ids = _features(lm, windows, top_k=config.top_k, progress=progress)
    per_window = config.window
    fit = slice(0, n_fit * per_window)
    hold = slice(n_fit * per_window, None)
    final_top1 = teacher_ids[:, 0]  # (N,)
    n_exits = heads.n_early_exits

    def agreement() -> tuple[float, ...]:
        if not n_hold:
            return tuple(float("nan") for _ in range(n_exits))
        return tuple(
            (_top1(lm, heads, e, states[e, hold]) == final_top1[hold]).float().mean().item()
            for e in range(n_exits)
        )

    before = agreement()

    # Distillation over a sampled vocabulary: the union of the batch's teacher top-k.
    head_params = [p for name, p in heads.named_parameters() if not name.startswith("confidence")]
    optimizer = torch.optim.AdamW(head_params, lr=config.lr, weight_decay=0.0)
    n_fit_tokens = fit.stop
    steps_per_epoch = max(1, n_fit_tokens // config.batch_tokens)
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0)))
    )
    teacher_p = teacher_lp.exp()  # (N, k)
    teacher_p = teacher_p / teacher_p.sum(-1, keepdim=True)  # renormalised over the top-k
    weight = lm.lm_head.weight.detach()  # (V, H)
    heads.train()
    bar = tqdm(total=total_steps, desc="distil exit heads", disable=not progress)
    for _ in range(config.epochs):
        order = torch.randperm(n_fit_tokens, generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * config.batch_tokens : (step + 1) * config.batch_tokens]  # (b,)
            candidates, inverse = torch.unique(teacher_ids[index], return_inverse=True)  # (C,)
            w = weight[candidates]  # (C, H)
            p = teacher_p[index]  # (b, k)
            loss = torch.zeros(())
            for e in range(n_exits):  # a loop over the few exits: each has its own head
                logits = heads.transform(e, states[e, index]) @ w.T  # (b, C)
                log_q = torch.log_softmax(logits.float(), dim=-1).gather(1, inverse)  # (b, k)
                loss = loss + (p * (p.clamp_min(1e-12).log() - log_q)).sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
            bar.set_postfix(kl=f"{loss.item() / n_exits:.3f}")
    bar.close()
    heads.eval()
    after = agreement()

    # Learned confidence (CALM's meta classifier): predict agreement with the last layer.
    n_conf = min(config.confidence_tokens, n_fit_tokens)
    conf_index = torch.randperm(n_fit_tokens, generator=generator)[:n_conf]
    with torch.no_grad():
        inputs = [heads.transform(e, states[e, conf_index]) for e in range(n_exits)]  # (n, H)
        labels = [
            (_top1(lm, heads, e, states[e, conf_index]) == final_top1[conf_index]).float()
            for e in range(n_exits)
        ]
    conf_params = list(heads.confidence.parameters())
    conf_optimizer = torch.optim.AdamW(conf_params, lr=3e-3, weight_decay=1e-4)
    for _ in tqdm(range(config.confidence_epochs), desc="learned confidence", disable=not progress):
        order = torch.randperm(n_conf, generator=generator)
        for index in order.split(config.batch_tokens):
            loss = torch.zeros(())
            for e in range(n_exits):
                logit = heads.confidence_logit(e, inputs[e][index])  # (b,)
                loss = loss + F.binary_cross_entropy_with_logits(logit, labels[e][index])
            conf_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            conf_optimizer.step()
    heads.eval()
    heads.requires_grad_(False)

    accuracy: tuple[float, ...] = tuple(float("nan") for _ in range(n_exits))
    if n_hold:
        with torch.no_grad():
            accuracy = tuple(
                (
                    (heads.confidence_logit(e, heads.transform(e, states[e, hold])) > 0)
                    == (_top1(lm, heads, e, states[e, hold]) == final_top1[hold])
                )
                .float()
                .mean()
                .item()
                for e in range(n_exits)
            )
    report = TrainReport(
        exit_layers=heads_config.exit_layers,
        agreement_before=before,
        agreement_after=after,
        confidence_accuracy=accuracy,
        seconds=time.perf_counter() - started,
    )
    return heads, report


def heads_key(
    model: Any,
    *,
    corpus: str,
    exit_layers: tuple[int, ...] | None,
    rank: int,
    confidence_width: int,
    config: TrainConfig,
) -> str:
    """Fingerprint of everything the trained heads depend on (names the cache folder)."""
    payload = {
        "model": model_fingerprint(model),
        "corpus": corpus,
        "exit_layers": list(exit_layers) if exit_layers is not None else None,
        "rank": rank,
        "confidence_width": confidence_width,
        "train": dataclasses.asdict(config),
        "version": 1,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cached_exit_heads(
    model: Any,
    tokenizer: Any,
    *,
    corpus: str = "kjv",
    exit_layers: tuple[int, ...] | None = None,
    rank: int = 32,
    confidence_width: int = 64,
    config: TrainConfig | None = None,
    folder: str | Path | None = None,
    progress: bool = True,
) -> tuple[ExitHeads, dict[str, Any]]:
    """Trained exit heads from the cache, training (and caching) them when missing or corrupted.

    Parameters
    ----------
    model, tokenizer
        From :func:`~exitguard.tasks.language.model.load_model`.
    corpus : {"kjv", "pydoc", "python-docs"}
        Training text (see :mod:`exitguard.data.text`).
    folder : path, optional
        Where to keep the heads; default ``cache_dir()/lm-exits/<fingerprint>``.

    Returns
    -------
    heads : ExitHeads
    meta : dict
        The heads' JSON metadata (training report included).
    """
    from exitguard.data.text import corpus_text

    config = config if config is not None else TrainConfig()
    if exit_layers is None:
        exit_layers = default_exit_layers(len(model.model.layers))
    key = heads_key(
        model,
        corpus=corpus,
        exit_layers=exit_layers,
        rank=rank,
        confidence_width=confidence_width,
        config=config,
    )
    target = Path(folder) if folder is not None else cache_dir() / "lm-exits" / key
    fingerprint = model_fingerprint(model)
    try:
        heads = ExitHeads.load(target, model_fingerprint=fingerprint)
        meta = read_heads_meta(target)
        if meta.get("key") == key:
            return heads, meta
    except HeadsFileError:
        pass  # missing or corrupted: (re)train below
    text = corpus_text(corpus)
    token_ids = torch.tensor(
        tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long
    )
    heads, report = train_exit_heads(
        model,
        token_ids,
        exit_layers=exit_layers,
        rank=rank,
        confidence_width=confidence_width,
        config=config,
        progress=progress,
    )
    extra = {
        "key": key,
        "corpus": corpus,
        "train": dataclasses.asdict(config),
        "report": report.to_dict(),
    }
    heads.save(target, extra=extra)
    meta = read_heads_meta(target)
    return heads, meta
