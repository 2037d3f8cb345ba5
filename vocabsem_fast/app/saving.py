"""The folder a ``TextClassifier`` is saved to, and the base model's fingerprint.

    config.json               what the classifier is (versioned; JSON, so loading runs no code)
    classifier.safetensors    its tensors (safetensors: raw arrays, never unpickled)

Both files vouch for each other: ``config.json`` records the size and SHA-256 of the tensor file,
and the tensor file's metadata records the SHA-256 of the configuration. A missing, truncated or
edited file is therefore found on loading and named in a ``SavedClassifierError``. The folder is
written under a temporary name and renamed into place, so an interrupted save leaves no folder
that loads (and an earlier one at that path untouched).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from ..bases import lm_head_weight
from ..cache import write_directory_atomically

FORMAT = "vocabsem_fast.text_classifier"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "classifier.safetensors"


class SavedClassifierError(ValueError):
    """A folder that is not an intact saved classifier: the message names the file and why."""


def _canonical_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_folder(path: str | Path, config: dict, tensors: dict[str, Tensor]) -> Path:
    """Write ``config`` (JSON-able) and ``tensors`` as a classifier folder at ``path``, atomically."""
    from safetensors.torch import save_file

    config = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}

    def build(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS), metadata={"config_sha256": _canonical_sha256(config)})
        weights = folder / WEIGHTS
        record = {**config, "files": {WEIGHTS: {"bytes": weights.stat().st_size, "sha256": _file_sha256(weights)}}}
        (folder / CONFIG).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    return write_directory_atomically(path, build)


def read_folder(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """``(config, tensors)`` of an intact classifier folder, or a ``SavedClassifierError`` that
    names the file at fault."""
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    if not root.is_dir():
        raise SavedClassifierError(f"{root}: no such folder (a saved classifier is a folder with {CONFIG} and "
                                   f"{WEIGHTS})")
    config_path, weights_path = root / CONFIG, root / WEIGHTS
    try:
        record = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SavedClassifierError(f"{config_path}: missing (not a saved classifier folder?)") from None
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise SavedClassifierError(f"{config_path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise SavedClassifierError(f"{config_path}: not a saved classifier (format {record.get('format')!r} "
                                   f"where {FORMAT!r} was expected)" if isinstance(record, dict) else
                                   f"{config_path}: not a saved classifier (not a JSON object)")
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise SavedClassifierError(f"{config_path}: format version {version!r}; this vocabsem_fast reads version "
                                   f"{FORMAT_VERSION} (saved by another release?)")
    expected = (record.get("files") or {}).get(WEIGHTS)
    if not isinstance(expected, dict) or not {"bytes", "sha256"} <= expected.keys():
        raise SavedClassifierError(f"{config_path}: edited (its record of {WEIGHTS} is missing)")
    if not weights_path.is_file():
        raise SavedClassifierError(f"{weights_path}: missing")
    size = weights_path.stat().st_size
    if size != expected["bytes"]:
        raise SavedClassifierError(f"{weights_path}: {'truncated' if size < expected['bytes'] else 'changed'} "
                                   f"({size} bytes, saved with {expected['bytes']})")
    if _file_sha256(weights_path) != expected["sha256"]:
        raise SavedClassifierError(f"{weights_path}: changed since it was saved (checksum mismatch)")
    config = {k: v for k, v in record.items() if k != "files"}
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise SavedClassifierError(f"{weights_path}: unreadable ({type(exc).__name__}: {exc})") from None
    if metadata.get("config_sha256") != _canonical_sha256(config):
        raise SavedClassifierError(f"{config_path}: edited since it was saved (it no longer matches {WEIGHTS})")
    return config, tensors


# A tensor's fingerprint reads at most this many of its values, evenly spaced; the head is read whole.
_SAMPLE = 1 << 16


def weights_fingerprint(model) -> str:
    """SHA-256 identifying a model's weights: every parameter's and buffer's name, dtype and
    shape, an evenly spaced sample of its values (all of a small tensor) and the whole LM head.
    Independent of where the model was loaded from and of the transformers version; a model
    fine-tuned, quantised or cast to another dtype gets another fingerprint. (A sample, not every
    value, so that large models are fingerprinted in well under a second: two models that differ
    only between the sampled values of a tensor other than the head would look alike.)"""
    digest = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            flat = t.detach().reshape(-1)
            if flat.numel() > _SAMPLE:
                flat = flat[:: flat.numel() // _SAMPLE][:_SAMPLE]
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        head = lm_head_weight(model).detach().cpu().contiguous()
        digest.update(head.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
