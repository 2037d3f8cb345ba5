"""Data-parallel training of the semantic clustering module on one machine: ``nproc`` spawned
processes on gloo (loopback), each training ``VDSClassifier.fit(distributed=True)`` on its share
of every batch; rank 0's trained module is loaded back. Under ``torchrun`` call
``fit(distributed=True)`` yourself instead (see the README's guide)."""

from __future__ import annotations

import os
import tempfile

import torch

from ..distributed import run_on_local_group
from .representations import Representations
from .semantic_clustering import SemanticClustering, VDSClassifier


def _worker(rank: int, nproc: int, folder: str, threads: int) -> None:
    torch.set_num_threads(threads)
    job = torch.load(os.path.join(folder, "job.pt"), weights_only=False)
    classifier = job["classifier"].fit(job["reps"], job["labels"], distributed=True)
    if rank == 0:
        torch.save(classifier.module.state_dict(), os.path.join(folder, "module.pt"))


def fit_data_parallel(classifier: VDSClassifier, reps: Representations, labels: torch.Tensor,
                      nproc: int, *, progress: str | None = None) -> VDSClassifier:
    """``classifier.fit(reps, labels)`` with DDP over ``nproc`` local processes (a progress bar
    described by ``progress`` in the single-process case)."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if nproc == 1:
        return classifier.fit(reps, labels, progress=progress)
    threads = max(1, torch.get_num_threads() // nproc)
    with tempfile.TemporaryDirectory() as folder:
        torch.save({"classifier": classifier, "reps": reps, "labels": labels}, os.path.join(folder, "job.pt"))
        run_on_local_group(_worker, nproc, folder, threads)
        state = torch.load(os.path.join(folder, "module.pt"))
    classifier.module = SemanticClustering(classifier.bases.shape[1], attention=classifier.config.attention)
    classifier.module.load_state_dict(state)
    classifier.module.eval()
    return classifier
