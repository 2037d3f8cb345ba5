"""Data-parallel fitting of the semantic clustering module (DDP on 2 gloo processes) equals one process."""

from __future__ import annotations

import torch

from vocabsem_fast.app.data_parallel import fit_data_parallel
from vocabsem_fast.app.semantic_clustering import FitConfig, VDSClassifier

from helpers import assert_matches
from test_semantic_clustering import _synthetic


def test_data_parallel_fit_matches_one_process():
    reps, labels, bases, label_ids = _synthetic(15)  # 45 examples: batches of 32 and 13 split unevenly
    config = FitConfig(epochs=3, lr=3e-3, seed=int(torch.randint(1000, ())))
    one = VDSClassifier(bases, label_ids, config=config).fit(reps, labels)
    two = fit_data_parallel(VDSClassifier(bases, label_ids, config=config), reps, labels, nproc=2)
    for (name, a), b in zip(one.module.state_dict().items(), two.module.state_dict().values()):
        assert_matches(b, a, tol=1e-5, name=name)
    assert torch.equal(one.predict(reps), two.predict(reps))
