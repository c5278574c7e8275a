"""Triton kernels (one op per module), imported only where triton is installed and the op runs
on CUDA; the ops that launch them, with their torch composites and fakes, are in ``ops/``."""
