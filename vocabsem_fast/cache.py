"""Disk cache entries: safetensors files and directories, keyed by a hash of what they derive from.

Every entry records its key, and a tensor file the checksum of each tensor, so an entry that is
corrupt, truncated, unreadable or written for other inputs is never used: ``load_tensors`` and
``load_directory`` warn (a ``CacheWarning`` naming the path and the reason) and return None, the
caller recomputes and saving overwrites the entry. Writes are atomic: an entry is built under a
temporary name in its own folder and renamed into place, so a reader sees the old entry or the
new one, never part of one. A missing entry is an ordinary miss: None, without a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import torch
from torch import Tensor

# Part of every key and of every entry's metadata: changing how entries are laid out invalidates
# all of them at once.
FORMAT = "vocabsem_fast.cache/1"
MARKER = ".vocabsem-entry.json"  # a directory entry's metadata, written after everything else


class CacheWarning(UserWarning):
    """A cache entry was damaged or stale and is being recomputed, or could not be written."""


def default_cache_dir() -> Path:
    """``$VOCABSEM_CACHE`` or ``~/.cache/vocabsem_fast``."""
    root = os.environ.get("VOCABSEM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "vocabsem_fast"


def tensor_sha256(t: Tensor) -> str:
    """SHA-256 of a tensor's bytes (in memory order of its contiguous copy)."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def content_key(description: object, *data: Tensor | bytes) -> str:
    """Hex SHA-256 of a JSON-able ``description`` and of ``data`` (tensors: dtype, shape and
    bytes), together with ``FORMAT``. Put the caller's own format version in ``description``."""
    parts = []
    for item in data:
        if isinstance(item, Tensor):
            parts.append(["tensor", str(item.dtype), list(item.shape), tensor_sha256(item)])
        elif isinstance(item, (bytes, bytearray, memoryview)):
            parts.append(["bytes", hashlib.sha256(item).hexdigest()])
        else:
            raise TypeError(f"content_key hashes tensors and bytes, got {type(item).__name__}")
    text = json.dumps({"format": FORMAT, "description": description, "data": parts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _warn(path: Path, reason: str) -> None:
    warnings.warn(f"cache entry {path} is {reason}; recomputing it", CacheWarning, stacklevel=3)


def _temporary_sibling(path: Path, suffix: str) -> Path:
    # unique per process and call, hidden, and in the same folder so os.replace stays one rename
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        return True
    return True


def sweep_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of ``path`` left by processes that no longer run (killed while
    writing: an interrupt cleans up after itself, ``kill -9`` cannot). A live writer's are kept,
    so two processes filling the same entry both succeed. Returns what was removed."""
    removed = []
    prefix = f".{path.name}."
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        rest = sibling.name[len(prefix):] if sibling.name.startswith(prefix) else ""
        pid, _, tail = rest.partition(".")
        if not (pid.isdigit() and tail.endswith((".tmp", ".old"))):
            continue
        if int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(sibling)
            removed.append(sibling)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---- tensor files --------------------------------------------------------------------------------

def save_tensors(path: str | os.PathLike, key: str, tensors: Mapping[str, Tensor]) -> None:
    """Write ``tensors`` to the safetensors file ``path`` as the entry for ``key``, atomically.
    A cache that cannot be written (read-only, full) gives a ``CacheWarning``, not an error."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    table = {name: {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": tensor_sha256(t)}
             for name, t in tensors.items()}
    metadata = {"format": FORMAT, "key": key, "tensors": json.dumps(table, sort_keys=True)}
    tmp = _temporary_sibling(path, ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(path)
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only or full cache: the result stands, it is just not kept
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write cache entry {path} ({type(exc).__name__}: {exc}); the result is not "
                      "cached", CacheWarning, stacklevel=2)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_tensors(path: str | os.PathLike, key: str, *, names: Collection[str] = ()) -> dict[str, Tensor] | None:
    """The tensors of the entry ``path`` when it is intact, was written for ``key`` and holds
    every tensor in ``names``; otherwise None, with a ``CacheWarning`` unless the file is absent."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            problem = _header_problem(metadata, key, set(f.keys()), set(names))
            # a stale entry is rejected before its (possibly large) payload is read
            tensors = {} if problem else {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        return None  # removed since the check above: a miss like any other
    except (SafetensorError, OSError) as exc:
        _warn(path, f"unreadable ({type(exc).__name__}: {exc})")
        return None
    if problem is None:
        problem = _payload_problem(tensors, json.loads(metadata["tensors"]))
    if problem is not None:
        _warn(path, problem)
        return None
    return tensors


def _header_problem(metadata: Mapping[str, str], key: str, stored: set[str], wanted: set[str]) -> str | None:
    """Why the header of a tensor entry disqualifies it, or None."""
    if metadata.get("format") != FORMAT:
        return f"stale (format {metadata.get('format')!r}, expected {FORMAT!r})"
    if metadata.get("key") != key:
        return "stale (written for other inputs)"
    try:
        table = json.loads(metadata["tensors"])
        ok = isinstance(table, dict) and all(
            isinstance(v, dict) and {"dtype", "shape", "sha256"} <= v.keys() for v in table.values())
    except (KeyError, ValueError):  # ValueError: JSONDecodeError
        ok = False
    if not ok:
        return "corrupt (its metadata lacks a valid tensor table)"
    if set(table) != stored:
        return f"corrupt (holds tensors {sorted(stored)}, its metadata lists {sorted(table)})"
    if not wanted <= stored:
        return f"stale (lacks tensors {sorted(wanted - stored)})"
    return None


def _payload_problem(tensors: Mapping[str, Tensor], table: Mapping[str, dict]) -> str | None:
    """Why the tensors read from an entry differ from what its metadata recorded, or None."""
    for name, t in tensors.items():
        expected = table[name]
        # dtype and shape first: hashing needs a tensor of the recorded kind
        if str(t.dtype) != expected["dtype"] or list(t.shape) != expected["shape"]:
            return (f"corrupt (tensor {name!r} is {t.dtype} {list(t.shape)}, recorded as "
                    f"{expected['dtype']} {expected['shape']})")
        if tensor_sha256(t) != expected["sha256"]:
            return f"corrupt (checksum mismatch for tensor {name!r})"
    return None


# ---- directories ---------------------------------------------------------------------------------

def load_directory(path: str | os.PathLike, key: str) -> Path | None:
    """``path`` when it is a complete directory entry for ``key``; otherwise None, with a
    ``CacheWarning`` unless nothing is there."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    problem = _directory_problem(path, key)
    if problem is not None:
        _warn(path, problem)
        return None
    return path


def save_directory(path: str | os.PathLike, key: str, build: Callable[[Path], None]) -> Path:
    """Publish the directory entry ``path`` for ``key``: ``build(folder)`` fills an empty
    temporary sibling, the marker recording every file's size is written last and the folder is
    renamed into place, replacing whatever was there. Returns ``path``."""

    def build_and_mark(tmp: Path) -> None:
        build(tmp)
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*"))
                 if p.is_file() and p.name != MARKER}
        (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "key": key, "files": files}, indent=1) + "\n")

    # another process may publish the same entry between our two renames: keep its entry if good
    return write_directory_atomically(path, build_and_mark, keep_rival=lambda: _directory_problem(Path(path), key)
                                      is None)


def write_directory_atomically(path: str | os.PathLike, build: Callable[[Path], None], *,
                               keep_rival: Callable[[], bool] = lambda: False) -> Path:
    """Fill ``path`` as a whole or not at all: ``build(folder)`` fills an empty temporary sibling,
    which is renamed into place (replacing what was there) only when ``build`` returns. An error
    or an interrupt leaves the old folder, or nothing; a killed writer's temporary is swept by
    the next write. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path)
    tmp = _temporary_sibling(path, ".tmp")
    tmp.mkdir()
    try:
        build(tmp)
        _publish(tmp, path, keep_rival)
    finally:
        if tmp.exists():
            _remove(tmp)
    return path


def _publish(tmp: Path, path: Path, keep_rival: Callable[[], bool]) -> None:
    # a rename cannot replace a non-empty directory: move the old entry aside first
    old = _temporary_sibling(path, ".old")
    try:
        os.replace(path, old)
    except FileNotFoundError:
        old = None
    try:
        os.replace(tmp, path)
    except OSError:
        # another process published between the two renames
        if not keep_rival():
            if old is not None and not path.exists():  # put the old folder back: nothing is lost
                os.replace(old, path)
                old = None
            raise
    finally:
        if old is not None:
            _remove(old)


def _directory_problem(path: Path, key: str) -> str | None:
    """Why ``path`` is not a complete directory entry for ``key``, or None."""
    if not path.is_dir():
        return "not a directory"
    try:
        marker = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        return f"incomplete (no {MARKER})"
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        return f"unreadable ({MARKER}: {type(exc).__name__}: {exc})"
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return f"corrupt ({MARKER} is not an entry record)"
    if marker.get("format") != FORMAT:
        return f"stale (format {marker.get('format')!r}, expected {FORMAT!r})"
    if marker.get("key") != key:
        return "stale (written for other inputs)"
    for name, size in marker["files"].items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"incomplete ({name} is missing)"
        if actual != size:
            return f"corrupt ({name} has {actual} bytes, recorded as {size})"
    return None
