"""Sparse Flows, the method: ODE vector fields, CNFs (FFJORD), datasets and training.

Public API::

    from flows import ODEnet, ConvODEnet, CNF, SequentialFlow, MultiscaleFlow, ODEClassifier
    flow = CNF(ODEnet(2, (64, 64, 64), time="none", activation="sigmoid"))
    nll = -flow.log_prob(x).mean()
"""

from flows.cnf import CNF, Flow, SequentialFlow
from flows.divergence import sample_noise
from flows.likelihood import (
    LogitTransform,
    bits_per_dim,
    dequantize,
    nll_nats,
    standard_normal_logprob,
)
from flows.multiscale import MultiscaleFlow, Squeeze
from flows.neural_ode import ODEBlock, ODEClassifier
from flows.odefunc import ODEFunc, odesolve
from flows.odenet import (
    ACTIVATIONS,
    ConcatConv2d,
    ConcatLinear,
    ConcatSquashLinear,
    ConvODEnet,
    ODEnet,
)
from sparsekern.divergence import divergence_exact, divergence_hutchinson

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "CNF",
    "ConcatConv2d",
    "ConcatLinear",
    "ConcatSquashLinear",
    "ConvODEnet",
    "Flow",
    "LogitTransform",
    "MultiscaleFlow",
    "ODEBlock",
    "ODEClassifier",
    "ODEFunc",
    "ODEnet",
    "SequentialFlow",
    "Squeeze",
    "bits_per_dim",
    "dequantize",
    "divergence_exact",
    "divergence_hutchinson",
    "nll_nats",
    "odesolve",
    "sample_noise",
    "standard_normal_logprob",
]
