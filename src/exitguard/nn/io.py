"""Saving and loading: weights as safetensors, policies as JSON, never pickle.

A weights file records the network's number of exits, architecture fingerprint, confidence
measure and a SHA-256 checksum of its tensors in its metadata; a policy file records the
network through :meth:`EarlyExitNetwork.bind_policy`. Loading either checks that it fits the
network.

Guarantees of :func:`load_weights`: the file is read once, as a regular file (a FIFO or a
device is refused); its tensors are checked (checksum, finite values, names and shapes) in a
separate state dict before any of the network's tensors is touched, so a refused file leaves
the network exactly as it was. :func:`save_weights` writes atomically through
:mod:`exitguard._files` (a failed write leaves any old file intact, links are never followed).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from exitguard._files import FileSafetyError, atomic_save, parse_json, read_regular_file
from exitguard.nn.network import EarlyExitNetwork
from exitguard.policy import ExitPolicy

_FORMAT = "exitguard.EarlyExitNetwork"
_CHECKSUM_KEY = "tensors_sha256"
_MAX_WEIGHTS_BYTES = 1 << 36  # 64 GiB: a sanity limit, far above any network exitguard wraps
_MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as error:  # pragma: no cover - ships with the torch extra
        raise ImportError(
            'saving and loading weights needs safetensors: pip install "exitguard[torch]"'
        ) from error
    return safetensors


def _check_network(network: Any) -> EarlyExitNetwork:
    if not isinstance(network, EarlyExitNetwork):
        raise TypeError(f"`network` must be an EarlyExitNetwork; got {type(network).__name__}.")
    return network


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """The checksum a weights file records: ``"sha256:<hex>"`` over every tensor.

    The tensors are hashed in sorted name order, each as its name, dtype, shape and raw
    bytes (C order), so the checksum does not depend on the file's layout.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):  # a loop over tensors: each is hashed whole
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype!s}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + digest.hexdigest()


def _alias_key(name: str, tensor: Tensor) -> tuple[Any, ...]:
    """Tensors with equal keys are one tensor under several names (tied weights)."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return ("own", name)
    return (
        tensor.device.type,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
    )


def _alias_groups(state: Mapping[str, Tensor]) -> list[list[str]]:
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(_alias_key(name, tensor), []).append(name)
    return list(groups.values())


def stored_tensors(module: torch.nn.Module) -> dict[str, Tensor]:
    """The tensors a file stores for ``module``: its state dict on the CPU, tied tensors once."""
    state = module.state_dict()
    return {group[0]: state[group[0]].detach().to("cpu").clone() for group in _alias_groups(state)}


def assign_tensors(
    module: torch.nn.Module, tensors: Mapping[str, Tensor], *, strict: bool, source: Any
) -> None:
    """Copy ``tensors`` into ``module`` after checking names and shapes, or change nothing.

    A tied tensor (one tensor under several names) counts as present when any of its names
    is. Raises ValueError naming ``source`` when (with ``strict``) names are missing or
    unexpected, or when a shape differs.
    """
    current = module.state_dict()
    missing = [group for group in _alias_groups(current) if not any(n in tensors for n in group)]
    unexpected = sorted(set(tensors) - set(current))
    if strict and (missing or unexpected):
        raise ValueError(
            f"{source} does not match the network: missing {sorted(g[0] for g in missing)}, "
            f"unexpected {unexpected}; the network was left unchanged."
        )
    wrong = [
        f"{name} {tuple(tensor.shape)} (the network's is {tuple(current[name].shape)})"
        for name, tensor in tensors.items()
        if name in current and tuple(tensor.shape) != tuple(current[name].shape)
    ]
    if wrong:
        raise ValueError(
            f"{source} does not match the network: tensor shapes differ: "
            f"{', '.join(wrong[:5])}; the network was left unchanged."
        )
    # Every name and shape was checked above, so this copy cannot stop half-way.
    module.load_state_dict({k: v for k, v in tensors.items() if k in current}, strict=False)


def _non_finite(tensors: Mapping[str, Tensor]) -> list[str]:
    """Names of floating tensors holding NaN or infinite values, with how many."""
    found = []
    for name, tensor in tensors.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                found.append(f"{name} ({bad} of {tensor.numel()} values)")
    return found


def _non_finite_message(found: list[str], action: str) -> str:
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    return (
        f"refusing to {action} weights with NaN or infinite values: {shown}. A network with "
        "such weights gives meaningless predictions (usually a diverged training run); pass "
        "`allow_non_finite=True` to do it anyway."
    )


def save_weights(
    network: EarlyExitNetwork, path: str | os.PathLike[str], *, allow_non_finite: bool = False
) -> Path:
    """Write the network's parameters and buffers to a safetensors file, atomically.

    Tensors shared between modules (tied weights) are stored once. The metadata records the
    format, the number of exits, the architecture fingerprint, the confidence measure and the
    checksum of the tensors (:func:`tensors_sha256`). A new file gets the mode the umask
    gives; an existing target that is a link or not a regular file is refused.

    Raises
    ------
    ValueError
        When a tensor holds NaN or infinite values (unless ``allow_non_finite``).
    exitguard.FileSafetyError
        When ``path`` is a link, a folder or a special file, or its folder does not exist.
    """
    _check_network(network)
    tensors = stored_tensors(network)
    if not allow_non_finite and (found := _non_finite(tensors)):
        raise ValueError(_non_finite_message(found, "save"))
    metadata = {
        "format": _FORMAT,
        "n_exits": str(network.n_exits),
        "fingerprint": network.fingerprint,
        "confidence": network.confidence,
        _CHECKSUM_KEY: tensors_sha256(tensors),
    }
    save_file = _safetensors().torch.save_file
    return atomic_save(path, lambda name: save_file(tensors, name, metadata=metadata))


def _parse_header(header: bytes, path: Any) -> dict[str, str]:
    try:
        parsed = parse_json(header, max_depth=4, source=f"the header of {path}")
    except ValueError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from error
    metadata = parsed.get("__metadata__") if isinstance(parsed, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise ValueError(
            f"{path} is not an exitguard weights file (metadata `format` is {found!r}, expected "
            f"{_FORMAT!r})."
        )
    return {str(k): str(v) for k, v in metadata.items()}


def _header_length(prefix: bytes, size: int, path: Any) -> int:
    length = int.from_bytes(prefix[:8], "little") if len(prefix) >= 8 else -1
    if not 0 < length <= min(_MAX_HEADER_BYTES, size - 8):
        raise ValueError(
            f"{path} is not a readable safetensors file (its header length {length} does not "
            f"fit a file of {size} bytes)."
        )
    return length


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a weights file written by :func:`save_weights` (the header only)."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise FileSafetyError(f"path: {path} is not a regular file.")
        length = _header_length(handle.read(8), info.st_size, path)
        return _parse_header(handle.read(length), path)


def _read_weights_file(path: str | os.PathLike[str]) -> bytes:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError as error:
        raise FileNotFoundError(f"path: no such file: {path}") from error
    if size > _MAX_WEIGHTS_BYTES:
        raise FileSafetyError(
            f"path: {path} holds {size} bytes; the limit is {_MAX_WEIGHTS_BYTES}."
        )
    # The limit is the size just seen: read_regular_file allocates its limit, and refuses a
    # file that grew since (or that is not a regular file).
    return read_regular_file(path, max_bytes=max(size, 8), argument="path")


def load_weights(
    network: EarlyExitNetwork,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    require_checksum: bool = True,
    allow_non_finite: bool = False,
) -> EarlyExitNetwork:
    """Load weights written by :func:`save_weights` into a network of the same architecture.

    Everything is checked on a separate state dict first; the network's tensors are replaced
    only when the whole file fits, so a refused file changes nothing. The file is read once
    into memory (then checked and decoded from those bytes), so loading briefly needs about
    twice its size in memory.

    Parameters
    ----------
    network : EarlyExitNetwork
    path : path of a ``.safetensors`` file
    strict : bool, default True
        Refuse files with missing or unexpected tensors (without it, the matching tensors
        are loaded and the others left alone). Shapes must always match.
    require_checksum : bool, default True
        Refuse files without a recorded checksum (files written by exitguard before the
        checksum existed, or by other tools). A recorded checksum is always verified.
    allow_non_finite : bool, default False
        Load tensors holding NaN or infinite values instead of refusing them.

    Raises
    ------
    ValueError
        When the file is not an exitguard weights file, its tensors do not match their
        checksum (corruption), hold NaN or infinite values, or were written for a
        different number of exits or architecture (fingerprint), or (with ``strict``)
        tensors are missing or unexpected, or a shape differs.
    exitguard.FileSafetyError
        When ``path`` is not a regular file.
    """
    _check_network(network)
    data = _read_weights_file(path)
    length = _header_length(data[:8], len(data), path)
    metadata = _parse_header(data[8 : 8 + length], path)
    if metadata.get("n_exits") != str(network.n_exits):
        raise ValueError(
            f"{path} holds a network with {metadata.get('n_exits')} exits; this network has "
            f"{network.n_exits}."
        )
    if metadata.get("fingerprint") != network.fingerprint:
        raise ValueError(
            f"{path} holds a network with architecture fingerprint "
            f"{metadata.get('fingerprint')!r}; this network's is {network.fingerprint!r}. "
            "Build the same architecture (same backbone, cut points and heads) before loading."
        )
    safetensors = _safetensors()
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}).") from error
    del data
    recorded = metadata.get(_CHECKSUM_KEY)
    if recorded is None:
        if require_checksum:
            raise ValueError(
                f"{path} records no checksum of its tensors, so corruption cannot be detected "
                "(written by another tool or an older exitguard); pass `require_checksum=False` "
                "to load it unverified, then save it again with save_weights."
            )
    elif recorded != tensors_sha256(tensors):
        raise ValueError(
            f"the tensors in {path} do not match the checksum in its metadata: the file was "
            "damaged or changed after it was written. Restore it from a good copy."
        )
    if not allow_non_finite and (found := _non_finite(tensors)):
        raise ValueError(f"{path}: " + _non_finite_message(found, "load"))
    assign_tensors(network, tensors, strict=strict, source=path)
    return network


def save_policy(
    policy: ExitPolicy,
    path: str | os.PathLike[str],
    *,
    network: EarlyExitNetwork,
    key: bytes | str | None = None,
) -> Path:
    """Write ``policy`` as JSON after recording (and checking) the network it belongs to.

    With ``key`` (or ``$EXITGUARD_POLICY_KEY``) the file is signed (see
    :meth:`ExitPolicy.save`).
    """
    _check_network(network)
    return network.bind_policy(policy).save(path, key=key)


def load_policy(
    path: str | os.PathLike[str],
    *,
    network: EarlyExitNetwork,
    key: bytes | str | None = None,
    allow_unbound: bool = False,
) -> ExitPolicy:
    """Read a policy JSON file and check that it fits ``network``.

    The number of exits, the architecture fingerprint and the confidence measure are
    compared; a policy that records no network (no ``n_exits`` or ``model_fingerprint``)
    is refused unless ``allow_unbound`` (:func:`save_policy` always records them).

    Raises
    ------
    ValueError
        When the policy was calibrated for another network or confidence measure, or
        records none.
    exitguard.PolicyFileError
        When the file is not a valid policy (or, with a key, not signed with it).
    """
    _check_network(network)
    policy = ExitPolicy.load(path, key=key)
    try:
        network.check_policy(policy, allow_unbound=allow_unbound)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    return policy
