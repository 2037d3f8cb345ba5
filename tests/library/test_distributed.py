"""Vocabulary-parallel similarity cross-entropy on 2 and 3 gloo processes (loopback, spawned)
against the single-process loss: values, the full hidden gradient on every rank and each
shard's gradient."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

import vocabsem_fast as vs
from vocabsem_fast import distributed

from helpers import assert_matches

# (reduction, label_smoothing, normalize, scale, dtype); shards deliberately uneven
CASES = [("mean", 0.0, True, 20.0, torch.float32), ("sum", 0.1, True, 5.0, torch.float32),
         ("none", 0.0, False, 0.5, torch.float32), ("mean", 0.2, True, 10.0, torch.float64)]


def _inputs(seed: int, dtype):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(29, 13, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(47, 13, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randint(0, 47, (29,), generator=g)
    t[::5] = -100
    upstream = torch.rand(29, generator=g, dtype=torch.float64).to(dtype)
    return h, b, t, upstream


def _bounds(world: int, v: int) -> list[int]:
    cuts = [0, 5, 31, v] if world == 3 else [0, 30, v]  # uneven shards
    return cuts


def _worker(rank: int, world: int, seed: int, out_dir: str) -> None:
    results = []
    for i, (reduction, smoothing, normalize, scale, dtype) in enumerate(CASES):
        h, b, t, upstream = _inputs(seed + i, dtype)
        cuts = _bounds(world, b.shape[0])
        hidden = h.clone().requires_grad_(True)
        shard = b[cuts[rank]:cuts[rank + 1]].clone().requires_grad_(True)
        loss = distributed.similarity_cross_entropy(hidden, shard, t, vocab_start=cuts[rank], scale=scale,
                                                    normalize=normalize, reduction=reduction,
                                                    label_smoothing=smoothing)
        (loss * (upstream if reduction == "none" else 1.0)).sum().backward()
        results.append({"loss": loss.detach(), "dh": hidden.grad, "db": shard.grad})
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_loss_matches_single_process(world, tmp_path):
    seed = int(torch.randint(10**6, ()))  # from the test seed: a failure reproduces
    distributed.run_on_local_group(_worker, world, seed, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for i, (reduction, smoothing, normalize, scale, dtype) in enumerate(CASES):
        h, b, t, upstream = _inputs(seed + i, dtype)
        hidden, bases = h.clone().requires_grad_(True), b.clone().requires_grad_(True)
        loss = vs.similarity_cross_entropy(hidden, bases, t, scale=scale, normalize=normalize, reduction=reduction,
                                           label_smoothing=smoothing)
        (loss * (upstream if reduction == "none" else 1.0)).sum().backward()
        cuts = _bounds(world, b.shape[0])
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        for r, got in enumerate(ranks):
            name = f"world {world} case {i} rank {r}"
            assert_matches(got[i]["loss"], loss.detach(), tol=tol, name=f"{name} loss")
            assert_matches(got[i]["dh"], hidden.grad, tol=tol, name=f"{name} hidden grad")
            assert_matches(got[i]["db"], bases.grad[cuts[r]:cuts[r + 1]], tol=tol, name=f"{name} shard grad")


def _bad_shards_worker(rank: int, world: int, out_dir: str) -> None:
    h, b, t = torch.randn(4, 3), torch.randn(6, 3), torch.tensor([0, 1, 2, 3])
    try:  # both ranks claim the start of the vocabulary
        distributed.similarity_cross_entropy(h, b, t, vocab_start=0)
        message = "no error"
    except ValueError as exc:
        message = str(exc)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(message)


def test_overlapping_shards_are_rejected(tmp_path):
    distributed.run_on_local_group(_bad_shards_worker, 2, str(tmp_path))
    for r in range(2):
        assert "must tile the vocabulary" in (tmp_path / f"rank{r}.txt").read_text()


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        distributed.similarity_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]),
                                             vocab_start=0)


# --- ranks that cannot or do not agree: every rank raises, none waits --------------------------
def _scenario_call(name: str, rank: int):
    """(hidden, shard, targets, keyword arguments) of rank ``rank`` in scenario ``name``."""
    g = torch.Generator().manual_seed(0)
    h, b = torch.randn(6, 5, generator=g), torch.randn(7, 5, generator=g)
    t = torch.randint(0, 7, (6,), generator=g)
    cuts = [0, 4, 7]
    kwargs = dict(vocab_start=cuts[rank], scale=3.0)
    shard = b[cuts[rank]:cuts[rank + 1]]
    if name == "bad-argument" and rank == 1:
        h = h.tolist()
    elif name == "scale" and rank == 1:
        kwargs["scale"] = 4.0
    elif name == "rows" and rank == 1:
        h, t = h[:5], t[:5]
    elif name in ("targets-checked", "targets-unchecked") and rank == 1:
        t = (t + 1) % 7
    elif name == "target-range" and rank == 1:
        t = t.clone()
        t[2] = 7
    if name == "targets-checked":
        kwargs["check_consistency"] = True
    if name == "targets-unchecked":
        kwargs["check_consistency"] = False
    return h, shard, t, kwargs


def _scenario_worker(rank: int, world: int, name: str, out_dir: str) -> None:
    h, shard, t, kwargs = _scenario_call(name, rank)
    try:
        distributed.similarity_cross_entropy(h, shard, t, **kwargs)
        message = "no error"
    except (TypeError, ValueError) as exc:
        message = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(message)


@pytest.mark.parametrize("name,expected", [
    ("bad-argument", ["rank(s) [1] rejected their arguments", "TypeError: hidden must be a torch.Tensor"]),
    ("scale", ["the ranks disagree on scale: [3.0, 4.0]"] * 2),
    ("rows", ["the ranks disagree on N: [6.0, 5.0]"] * 2),
    ("targets-checked", ["the ranks hold different targets"] * 2),
    ("targets-unchecked", ["no error"] * 2),
    ("target-range", ["targets must lie in [0, 7)"] * 2),
])
def test_every_rank_stops_together(name, expected, tmp_path):
    # a short timeout: a rank left waiting fails this test in seconds, not in 30 minutes
    distributed.run_on_local_group(_scenario_worker, 2, name, str(tmp_path), timeout=30)
    for rank, part in enumerate(expected):
        assert part in (tmp_path / f"rank{rank}.txt").read_text(), (rank, (tmp_path / f"rank{rank}.txt").read_text())


def _empty_shard_worker(rank: int, world: int, out_dir: str) -> None:
    g = torch.Generator().manual_seed(1)
    h, b = torch.randn(5, 4, generator=g), torch.randn(2, 4, generator=g)
    t = torch.tensor([0, 1, -100, 1, 0])
    cuts = [0, 1, 2, 2]  # V = 2 over 3 ranks: the last shard is empty
    hidden = h.clone().requires_grad_(True)
    shard = b[cuts[rank]:cuts[rank + 1]].clone().requires_grad_(True)
    loss = distributed.similarity_cross_entropy(hidden, shard, t, vocab_start=cuts[rank], scale=2.0,
                                                label_smoothing=0.1)
    loss.backward()
    torch.save({"loss": loss.detach(), "dh": hidden.grad, "db": shard.grad}, os.path.join(out_dir, f"{rank}.pt"))


def test_an_empty_shard_takes_part(tmp_path):
    """V smaller than the world size: the rank with no rows used to fail alone and hang the rest."""
    distributed.run_on_local_group(_empty_shard_worker, 3, str(tmp_path))
    g = torch.Generator().manual_seed(1)
    h, b = torch.randn(5, 4, generator=g), torch.randn(2, 4, generator=g)
    hidden, bases = h.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = vs.similarity_cross_entropy(hidden, bases, torch.tensor([0, 1, -100, 1, 0]), scale=2.0,
                                       label_smoothing=0.1)
    loss.backward()
    cuts = [0, 1, 2, 2]
    for rank in range(3):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert_matches(got["loss"], loss.detach(), tol=2e-6, name=f"rank {rank} loss")
        assert_matches(got["dh"], hidden.grad, tol=2e-6, name=f"rank {rank} hidden grad")
        assert got["db"].shape == (cuts[rank + 1] - cuts[rank], 4)
        assert_matches(got["db"], bases.grad[cuts[rank]:cuts[rank + 1]], tol=2e-6, name=f"rank {rank} shard grad")


# --- the local launcher ------------------------------------------------------------------------
def _aborting_at_exit_worker(rank: int, world: int, out_dir: str) -> None:
    import atexit

    # stands in for gloo's threads aborting an exiting interpreter after all work was done
    atexit.register(os.abort)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write("done")


def test_an_abort_while_the_interpreter_exits_does_not_fail_a_finished_run(tmp_path):
    distributed.run_on_local_group(_aborting_at_exit_worker, 2, str(tmp_path))
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["done", "done"]


def _failing_worker(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 cannot go on")


def test_an_error_in_one_process_is_raised_by_the_launcher():
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 cannot go on"):
        distributed.run_on_local_group(_failing_worker, 2)
    with pytest.raises(ValueError, match="world"):
        distributed.run_on_local_group(_failing_worker, 0)
