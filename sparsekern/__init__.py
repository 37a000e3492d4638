"""sparsekern: the engine that turns pruned vector fields into sparse and fused kernels.

Public API::

    from sparsekern import compile_sparse, SparseConfig, write_back
    fast = compile_sparse(f)                  # f(t, z) or f(z), pruned or not
    dz = fast(t, z)                           # same call, same result
    dz, div = fast.forward_and_divergence(t, z, noise)   # Hutchinson; noise=None: exact
    fast.write_back()                         # trained kept values back into f

``compile_sparse(model)`` also compiles every vector field a model declares
(``sparsekern_fields()``), e.g. the ODE functions of a flow. Model code tells the
engine what its MLPs are through ``sparsekern.protocol`` (``sparsekern_mlp()``,
``register_mlp``). See docs/design.md, "The engine contract".
"""

from sparsekern.compile import compile_sparse, compiled_fields, write_back
from sparsekern.config import SparseConfig
from sparsekern.field import CompiledField, FieldContract
from sparsekern.fused import FusedMLP
from sparsekern.generic import GenericField
from sparsekern.masks import CompileError
from sparsekern.protocol import Dynamics, LinearSpec, MLPSpec, register_mlp
from sparsekern.solver import MaxStepsError, SolveError, odeint

__version__ = "0.1.0"

__all__ = [
    "CompileError",
    "CompiledField",
    "Dynamics",
    "FieldContract",
    "FusedMLP",
    "GenericField",
    "LinearSpec",
    "MLPSpec",
    "MaxStepsError",
    "SolveError",
    "SparseConfig",
    "compile_sparse",
    "compiled_fields",
    "odeint",
    "register_mlp",
    "write_back",
]
