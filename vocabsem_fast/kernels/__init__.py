"""Triton kernels of vocabsem_fast (installed as ``vocabsem_fast.kernels``).

The GPU kernels live here, one module per kernel; the ``triton`` backend in
``vocabsem_fast.backends`` reports itself unavailable until they are present.
"""
