"""sparsekern: the engine that turns pruned vector fields into sparse and fused kernels.

Its public entry point, ``compile_sparse``, is built on top of the ``flows``
models (see DESIGN.md, "The engine contract").
"""

__version__ = "0.1.0"
