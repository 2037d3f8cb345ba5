"""The disk-cache helper: content keys, tensor-file entries and directory entries."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from vocabsem_fast import cache


def _tensors() -> dict[str, torch.Tensor]:
    return {"a": torch.randn(7, 5), "b": torch.randint(0, 100, (3,)), "empty": torch.empty(0, 4)}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got is not None and set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name])


@pytest.fixture
def entry(tmp_path):
    """A saved entry: (path, key, tensors)."""
    tensors = _tensors()
    key = cache.content_key({"entry": "test/1"}, tensors["a"])
    path = tmp_path / "entry.safetensors"
    cache.save_tensors(path, key, tensors)
    return path, key, tensors


def _clean_load(path, key, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return cache.load_tensors(path, key, **kw)


# ---- keys ----------------------------------------------------------------------------------------

def test_key_changes_with_content_and_format(monkeypatch):
    t = torch.randn(4, 3)
    key = cache.content_key({"entry": "x/1", "rcond": None}, t, b"raw")
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache.content_key({"rcond": None, "entry": "x/1"}, t.clone(), b"raw") == key  # same content
    changed = t.clone()
    changed[2, 1] += 1.0
    others = [
        cache.content_key({"entry": "x/2", "rcond": None}, t, b"raw"),  # caller's format
        cache.content_key({"entry": "x/1", "rcond": 0.1}, t, b"raw"),
        cache.content_key({"entry": "x/1", "rcond": None}, changed, b"raw"),
        cache.content_key({"entry": "x/1", "rcond": None}, t.double(), b"raw"),  # dtype
        cache.content_key({"entry": "x/1", "rcond": None}, t.reshape(3, 4), b"raw"),  # shape, same bytes
        cache.content_key({"entry": "x/1", "rcond": None}, t, b"raw!"),
        cache.content_key({"entry": "x/1", "rcond": None}, b"raw", t),  # order
    ]
    monkeypatch.setattr(cache, "FORMAT", cache.FORMAT + "-next")
    others.append(cache.content_key({"entry": "x/1", "rcond": None}, t, b"raw"))  # the helper's format
    assert len(set(others + [key])) == len(others) + 1


def test_key_rejects_what_it_cannot_hash():
    with pytest.raises(TypeError):
        cache.content_key({"x": 1}, "a string is not data")
    with pytest.raises(TypeError):
        cache.content_key({"x": object()})


# ---- tensor files --------------------------------------------------------------------------------

def test_round_trip(entry):
    path, key, tensors = entry
    _assert_same(_clean_load(path, key, names=["a", "b"]), tensors)


def test_save_leaves_no_temporary_file_and_replaces_the_old_entry(entry):
    path, key, _ = entry
    newer = {"a": torch.randn(2, 2)}
    cache.save_tensors(path, key, newer)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    _assert_same(_clean_load(path, key), newer)


def test_interrupted_save_keeps_the_old_entry(entry, monkeypatch):
    import safetensors.torch

    path, key, tensors = entry
    real = safetensors.torch.save_file

    def crash_half_way(data, filename, metadata=None):
        real(data, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # a partly written file, then the crash
            f.truncate(f.seek(0, 2) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        cache.save_tensors(path, key, {"a": torch.randn(9, 9)})
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    _assert_same(_clean_load(path, key), tensors)


def test_missing_entry_is_a_silent_miss(tmp_path):
    assert _clean_load(tmp_path / "absent.safetensors", "0" * 64) is None


def _truncate(path, key):
    path.write_bytes(path.read_bytes()[:-7])


def _truncate_header(path, key):
    path.write_bytes(path.read_bytes()[:20])


def _garble(path, key):
    path.write_bytes(b"this is not a safetensors file at all")


def _garble_header(path, key):
    raw = bytearray(path.read_bytes())
    raw[10:30] = b"\xff" * 20
    path.write_bytes(bytes(raw))


def _flip_payload_byte(path, key):
    raw = bytearray(path.read_bytes())
    raw[-30] ^= 0x5A  # inside tensor data: the file still parses
    path.write_bytes(bytes(raw))


def _rewrite(path, metadata: dict, tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        old_meta = f.metadata()
        old = {name: f.get_tensor(name) for name in f.keys()}
    save_file(tensors if tensors is not None else old, str(path), metadata={**old_meta, **metadata})


def _other_key(path, key):
    _rewrite(path, {"key": "f" * 64})


def _other_format(path, key):
    _rewrite(path, {"format": "vocabsem_fast.cache/0"})


def _bad_table(path, key):
    _rewrite(path, {"tensors": "{not json"})


def _no_metadata(path, key):
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path))


def _checksum_mismatch(path, key):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    tensors["a"] = tensors["a"] + 1.0  # same dtype and shape, other values
    _rewrite(path, {}, tensors)


def _dropped_tensor(path, key):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys() if name != "b"}
    _rewrite(path, {}, tensors)


def _reshaped_tensor(path, key):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    tensors["a"] = tensors["a"].reshape(5, 7).contiguous()  # same bytes, same checksum
    _rewrite(path, {}, tensors)


def _directory_in_place(path, key):
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "unreadable"),
    (_truncate_header, "unreadable"),
    (_garble, "unreadable"),
    (_garble_header, "unreadable"),
    (_flip_payload_byte, "checksum"),
    (_checksum_mismatch, "checksum"),
    (_other_key, "stale"),
    (_other_format, "stale"),
    (_no_metadata, "stale"),
    (_bad_table, "tensor table"),
    (_dropped_tensor, "holds tensors"),
    (_reshaped_tensor, "recorded as"),
    (_directory_in_place, "unreadable"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_damaged_entry_warns_gives_none_and_a_save_repairs_it(entry, damage, reason):
    path, key, tensors = entry
    damage(path, key)
    with pytest.warns(cache.CacheWarning, match=reason) as record:
        assert cache.load_tensors(path, key) is None
    assert len(record) == 1 and str(path) in str(record[0].message)
    if path.is_dir():
        path.rmdir()  # a folder in the way is not the cache's to delete
    cache.save_tensors(path, key, tensors)
    _assert_same(_clean_load(path, key), tensors)


def test_an_entry_without_a_wanted_tensor_is_stale(entry):
    path, key, _ = entry
    with pytest.warns(cache.CacheWarning, match=r"stale \(lacks tensors \['c'\]\)"):
        assert cache.load_tensors(path, key, names=["a", "c"]) is None


def test_cache_warning_is_a_user_warning():
    assert issubclass(cache.CacheWarning, UserWarning)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VOCABSEM_CACHE", str(tmp_path / "c"))
    assert cache.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("VOCABSEM_CACHE")
    assert cache.default_cache_dir().parts[-2:] == (".cache", "vocabsem_fast")


# ---- directories ---------------------------------------------------------------------------------

def _builder(content: str, calls: list):
    def build(folder):
        calls.append(folder)
        assert folder.is_dir() and not any(folder.iterdir())
        (folder / "weights.bin").write_text(content)
        (folder / "sub").mkdir()
        (folder / "sub" / "config.json").write_text("{}")
    return build


def _clean_directory(path, key):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return cache.load_directory(path, key)


def test_directory_round_trip_and_reuse(tmp_path):
    calls = []
    target = tmp_path / "models" / "m"
    assert _clean_directory(target, "k1") is None  # nothing there: a silent miss
    assert cache.save_directory(target, "k1", _builder("v1", calls)) == target
    assert _clean_directory(target, "k1") == target
    assert (target / "weights.bin").read_text() == "v1" and (target / "sub" / "config.json").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]  # no temporary sibling left
    assert calls[0] != target and calls[0].parent == target.parent  # built beside, not in place


def test_half_built_directory_is_rebuilt(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "weights.bin").write_text("half")  # an earlier run died before the marker
    with pytest.warns(cache.CacheWarning, match="incomplete") as record:
        assert cache.load_directory(target, "k1") is None
    assert str(target) in str(record[0].message)
    cache.save_directory(target, "k1", _builder("v1", []))
    assert _clean_directory(target, "k1") == target
    assert (target / "weights.bin").read_text() == "v1"


def _remove_marker(target):
    (target / cache.MARKER).unlink()


def _garble_marker(target):
    (target / cache.MARKER).write_bytes(b"\xff{")


def _truncate_a_file(target):
    (target / "weights.bin").write_text("v")


def _delete_a_file(target):
    (target / "sub" / "config.json").unlink()


def _other_marker_key(target):
    marker = json.loads((target / cache.MARKER).read_text())
    (target / cache.MARKER).write_text(json.dumps({**marker, "key": "k0"}))


def _marker_not_a_record(target):
    (target / cache.MARKER).write_text("[1, 2]")


@pytest.mark.parametrize("damage, reason", [
    (_remove_marker, "incomplete"),
    (_garble_marker, "unreadable"),
    (_truncate_a_file, "corrupt"),
    (_delete_a_file, "incomplete"),
    (_other_marker_key, "stale"),
    (_marker_not_a_record, "corrupt"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_damaged_directory_warns_and_is_rebuilt(tmp_path, damage, reason):
    target = tmp_path / "m"
    cache.save_directory(target, "k1", _builder("v1-long-content", []))
    damage(target)
    with pytest.warns(cache.CacheWarning, match=reason):
        assert cache.load_directory(target, "k1") is None
    cache.save_directory(target, "k1", _builder("v2-long-content", []))
    assert _clean_directory(target, "k1") == target
    assert (target / "weights.bin").read_text() == "v2-long-content"


def test_a_file_in_place_of_a_directory_is_replaced(tmp_path):
    target = tmp_path / "m"
    target.write_text("not a folder")
    with pytest.warns(cache.CacheWarning, match="not a directory"):
        assert cache.load_directory(target, "k1") is None
    cache.save_directory(target, "k1", _builder("v1", []))
    assert _clean_directory(target, "k1") == target


def test_failed_build_keeps_the_old_directory_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "m"
    cache.save_directory(target, "k1", _builder("v1", []))

    def failing(folder):
        (folder / "weights.bin").write_text("partial")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        cache.save_directory(target, "k2", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert _clean_directory(target, "k1") == target
    assert (target / "weights.bin").read_text() == "v1"


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("kind", ["tensors", "directory"])
def test_temporaries_of_killed_writers_are_swept_and_live_ones_kept(tmp_path, kind):
    """kill -9 during a write left its temporary file or folder behind for ever."""
    path = tmp_path / ("entry.safetensors" if kind == "tensors" else "entry")
    dead = tmp_path / f".{path.name}.{_dead_pid()}.0badc0de.tmp"
    dead_folder = tmp_path / f".{path.name}.{_dead_pid()}.0badc0df.old"
    live = tmp_path / f".{path.name}.{os.getppid()}.feedf00d.tmp"  # a running writer (our parent)
    unrelated = tmp_path / ".other.safetensors.1.abcdef12.tmp"
    dead.write_bytes(b"x" * 100)
    dead_folder.mkdir()
    (dead_folder / "weights").write_bytes(b"y")
    live.write_bytes(b"z")
    unrelated.write_bytes(b"w")
    if kind == "tensors":
        cache.save_tensors(path, "k", {"a": torch.randn(3)})
    else:
        cache.save_directory(path, "k", lambda folder: (folder / "f").write_text("1"))
    assert not dead.exists() and not dead_folder.exists()
    assert live.exists() and unrelated.exists() and path.exists()


def test_a_read_only_cache_warns_and_keeps_the_result(tmp_path, monkeypatch):
    """SemanticBasis.from_model raised after computing the bases when the cache was read-only."""
    import vocabsem_fast as vs

    from tiny_models import tiny_llama

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: make the write fail another way
            monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(13, "read-only")))
        model = tiny_llama()
        with pytest.warns(cache.CacheWarning, match="could not write cache entry"):
            basis = vs.SemanticBasis.from_model(model, cache_dir=locked / "bases")
        expected = vs.semantic_bases(model.get_output_embeddings().weight.detach())
        assert torch.equal(basis.vectors, expected)
        assert not any(p.name.endswith(".tmp") for p in locked.rglob("*"))
    finally:
        locked.chmod(0o700)


def _fill_concurrently(root: str, worker: int) -> None:
    from pathlib import Path

    import torch

    from vocabsem_fast import cache as c

    for i in range(20):
        c.save_tensors(Path(root) / "shared.safetensors", "k", {"a": torch.full((64,), float(worker * 100 + i))})
        c.save_directory(Path(root) / "shared-dir", "k", lambda folder, i=i: (folder / "f").write_text(str(i)))


def test_two_processes_filling_one_entry_both_succeed(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_fill_concurrently, args=(str(tmp_path), w)) for w in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    loaded = cache.load_tensors(tmp_path / "shared.safetensors", "k", names=["a"])
    assert loaded is not None and loaded["a"].shape == (64,)
    assert cache.load_directory(tmp_path / "shared-dir", "k") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared-dir", "shared.safetensors"]  # no temporaries left
