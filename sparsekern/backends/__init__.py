"""Kernel backends behind the op registry (``sparsekern.ops``): cpu (C++), cuda (C++/CUDA).

The ``ref`` backend is ``sparsekern.ref``; Triton kernels live in ``sparsekern.triton``.
"""
