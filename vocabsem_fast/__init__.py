"""vocabsem_fast: fused vocabulary-defined semantics for PyTorch.

Similarity logits, cross-entropy, top-k and cluster assignment of N hidden states against V
semantic bases, without materialising the N x V matrix. See ``reference`` for the plain
definitions every backend is tested against.
"""

from . import reference
from .backends import available_backends
from .bases import SemanticBasis, semantic_bases
from .kmeans import kmeans
from .ops import SimilarityCrossEntropyLoss, assign, similarity_cross_entropy, similarity_logits, similarity_topk

__version__ = "0.1.0"

__all__ = [
    "SemanticBasis",
    "SimilarityCrossEntropyLoss",
    "assign",
    "available_backends",
    "kmeans",
    "reference",
    "semantic_bases",
    "similarity_cross_entropy",
    "similarity_logits",
    "similarity_topk",
]
