"""Saving and loading: weights as safetensors, policies as JSON, never pickle.

A weights file records the network's number of exits, architecture fingerprint and
confidence measure in its metadata; a policy file records them through
:meth:`EarlyExitNetwork.bind_policy`. Loading either checks that it fits the network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from exitguard.nn.network import EarlyExitNetwork
from exitguard.policy import ExitPolicy

_FORMAT = "exitguard.EarlyExitNetwork"


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as error:  # pragma: no cover - ships with the torch extra
        raise ImportError(
            'saving and loading weights needs safetensors: pip install "exitguard[torch]"'
        ) from error
    return safetensors


def default_file_mode(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the mode a new file gets from the umask (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _check_network(network: Any) -> EarlyExitNetwork:
    if not isinstance(network, EarlyExitNetwork):
        raise TypeError(f"`network` must be an EarlyExitNetwork; got {type(network).__name__}.")
    return network


def save_weights(network: EarlyExitNetwork, path: str | os.PathLike[str]) -> Path:
    """Write the network's parameters and buffers to a safetensors file.

    Tensors shared between modules are stored once. The metadata records the format, the
    number of exits, the architecture fingerprint and the confidence measure.
    """
    _check_network(network)
    target = Path(path)
    metadata = {
        "format": _FORMAT,
        "n_exits": str(network.n_exits),
        "fingerprint": network.fingerprint,
        "confidence": network.confidence,
    }
    _safetensors().torch.save_model(network, str(target), metadata=metadata)
    default_file_mode(target)
    return target


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a weights file written by :func:`save_weights`."""
    safetensors = _safetensors()
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != _FORMAT:
        raise ValueError(
            f"{path} is not an exitguard weights file (metadata `format` is "
            f"{metadata.get('format')!r}, expected {_FORMAT!r})."
        )
    return dict(metadata)


def load_weights(
    network: EarlyExitNetwork, path: str | os.PathLike[str], *, strict: bool = True
) -> EarlyExitNetwork:
    """Load weights written by :func:`save_weights` into a network of the same architecture.

    Raises
    ------
    ValueError
        When the file was written for a different number of exits or architecture
        (fingerprint), or (with ``strict``) tensors are missing or unexpected.
    """
    _check_network(network)
    metadata = read_metadata(path)
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
    missing, unexpected = _safetensors().torch.load_model(
        network, str(path), strict=False, device=str(_device_of(network))
    )
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path} does not match the network: missing {sorted(missing)}, unexpected "
            f"{sorted(unexpected)}."
        )
    return network


def _device_of(network: EarlyExitNetwork) -> Any:
    reference = next(iter(network.parameters()), None)
    return reference.device if reference is not None else "cpu"


def save_policy(
    policy: ExitPolicy, path: str | os.PathLike[str], *, network: EarlyExitNetwork
) -> Path:
    """Write ``policy`` as JSON after recording (and checking) the network it belongs to."""
    _check_network(network)
    return network.bind_policy(policy).save(path)


def load_policy(path: str | os.PathLike[str], *, network: EarlyExitNetwork) -> ExitPolicy:
    """Read a policy JSON file and check that it fits ``network``.

    The number of exits, the architecture fingerprint and the confidence measure are
    compared when the policy records them (:func:`save_policy` always does).

    Raises
    ------
    ValueError
        When the policy was calibrated for another network or confidence measure.
    exitguard.PolicyFileError
        When the file is not a valid policy.
    """
    _check_network(network)
    policy = ExitPolicy.load(path)
    try:
        network.check_policy(policy)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    return policy
