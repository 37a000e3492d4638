"""The results.json schema: one row per (case, provider, metric), plus a "meta" object.

results.json is ``{"schema": SCHEMA_VERSION, "meta": {...}, "rows": [...]}``.
Every row carries the fields of ``ROW_FIELDS`` (null where a field does not
apply), so a row stands alone: it names its machine-independent setup (batch,
dtype, device, threads) as well as its numbers. ``meta`` holds what is common
to the run (machine, versions, options, duration); see ``META_FIELDS``.
bench/README.md reproduces both tables.
"""

from __future__ import annotations

# The metrics measured on whole solves of a flow (bench.metrics); here so that the
# torch-free report module reads the same tuple.
FLOW_METRICS = ("solve", "train_solve")

SCHEMA_VERSION = 1

ROW_FIELDS: dict[str, str] = {
    "case": 'case name "<shape>/<structure>/<density>", e.g. "miniboone/unstructured/0.1"',
    "shape": 'model shape name ("toy", "power", "gas", "hepmass", "miniboone", "bsds300", '
             'and the image shapes "mnist", "cifar10")',
    "shape_label": 'widths, activation, time input and blocks, e.g. "43-860x2-43 softplus '
                   'concatsquash x1", "1x28x28 conv3x3 64x3 softplus concat x1"',
    "structure": '"unstructured" (weights) or "structured" (neurons; filters of the image '
                 'shapes)',
    "density": "unstructured: kept fraction of the prunable weights; structured: kept fraction "
               "of the neurons (filters) of every hidden layer",
    "kept_fraction": "kept fraction of the prunable weights of one vector field (as measured)",
    "kept_weights": "kept prunable weights of one vector field (K in the FLOP counts; image "
                    "shapes: convolution taps, time channel included)",
    "dense_weights": "prunable weights of one dense vector field",
    "flop_ratio": "dense FLOPs / FLOPs of the reduced network (the kept state-path weights "
                  "between live units once dead neurons / filters are removed, time-channel "
                  "taps left out: the smaller dense convolutions structured pruning leaves); "
                  "null where nothing is left (a field that no longer depends on z)",
    "masks": 'unstructured cases below density 1: "random" or "magnitude" masks; null otherwise',
    "provider": 'what ran it: "dense_eager", "torch_compile", "torch_csr", "sparsekern", '
                '"sparsekern_<backend, layout or tier>", "sparsekern_native", "torchode", or '
                '"torch.mm" for the roofline row ("torch.conv2d" for the image shapes)',
    "metric": '"f", "f_div", "train_step", "solve", "train_solve", or "roofline"',
    "median_ms": "median time per call (f, f_div, train_step: per NFE; solve, train_solve: "
                 "the whole solve, or training step)",
    "p10_ms": "10th percentile of the samples",
    "p90_ms": "90th percentile of the samples",
    "repeats": "number of timed samples",
    "inner": "calls per sample (fast calls are batched to outlast timer resolution)",
    "first_ms": "the first call alone (includes compilation / extension load)",
    "nfe": "solve, train_solve: function evaluations of the forward dopri5 solve (all "
           "blocks; torchode: batched calls of the field); null otherwise",
    "nfe_backward": "train_solve with the adjoint: function evaluations of the backward "
                    "(adjoint) solves, all blocks; null otherwise (torchode backpropagates "
                    "through its steps)",
    "per_nfe_ms": "solve: median_ms / nfe; train_solve: median_ms / (nfe + nfe_backward)",
    "model_ms": "solve, train_solve: median time spent inside the vector-field evaluations "
                "(ODEFunc.forward, or the compiled field's forward_and_divergence that "
                "sparsekern.odeint calls); null if none was seen from Python (sparsekern.odeint's "
                "native evaluation of a time-free field, its C++ loop)",
    "solver_ms": "solve, train_solve: median time outside them (step control, tableau "
                 "combinations, host syncs; train_solve: also the adjoint's vector-Jacobian "
                 "products and the backward)",
    "ode_solver": 'solve, train_solve: the solver that ran it ("torchdiffeq", '
                  '"sparsekern.odeint", "torchode")',
    "solve_note": "solve, train_solve: what that solver said of its last solve "
                  "(sparsekern.odeint's last_solve, torchode's per-sample counts); null for "
                  "torchdiffeq",
    "flops": "floating-point operations on the kept weights per call (see README)",
    "gflops": "flops / median time, in GFLOP/s",
    "roofline_gflops": "GFLOP/s of torch.mm on the case's dense layer shapes at the row's "
                       "batch, measured in the same run (image shapes: F.conv2d on the dense "
                       "convolutions)",
    "roofline_fraction": "gflops / roofline_gflops",
    "speedup": "dense_eager median / this median for the same case and metric (>1: faster)",
    "rel_err": "norm-wise relative error of the outputs against dense_eager's on the same "
               "inputs (f: dz; f_div: max over dz and div; train_step: dL/dz; solve: log p; "
               "train_solve: max over the loss and the kept parameters' gradients, the loss "
               "alone where the parameters do not pair up)",
    "div_impl": 'how the divergence is computed ("autograd", "jvp", "vjp", "fused", ...)',
    "backend": "sparsekern: the backend it ran on (auto resolved); null for the others",
    "layouts": "sparsekern: per-layer layout of block 0 (dense / csr / blocked); null otherwise",
    "precision": 'sparsekern: the product precision (SparseConfig.precision: "ieee", or "bf16" '
                 '/ "fp16" for sparsekern_bf16 / _fp16); null for the others',
    "batch": "batch size of the measurement",
    "dtype": '"float32" or "float64"',
    "device": '"cpu", "cuda" or "cuda:<i>"',
    "threads": "torch.get_num_threads() during the run",
    "atol": "solve, train_solve: dopri5 absolute tolerance",
    "rtol": "solve, train_solve: dopri5 relative tolerance",
    "error": "null, or the exception that stopped this measurement (type: message)",
}

META_FIELDS: dict[str, str] = {
    "machine": "cpu_model, cpu_flags, cpu_count, threads, interop_threads, platform, python, "
               "torch, torchdiffeq, triton, cuda, cuda_available, gpu, gpu_capability, "
               "sparsekern, git_commit, device",
    "machine_slug": 'short machine name, e.g. "cpu-amd-epyc-2t" (the default output folder)',
    "command": "the command line",
    "options": "every option of the run (cases, providers, metrics, budget, batch, ...)",
    "providers": "description of each provider run",
    "skipped": "providers not available here, with the reason",
    "skipped_metrics": "per provider that ran, the selected metrics it does not measure, "
                       "with the reason (sparsekern_native, torchode: flow metrics only)",
    "skipped_shapes": "per provider that ran, the selected shapes it does not run, with the "
                      "reason (torch_csr, torch_bsr, torchode: not the image shapes)",
    "skipped_case_metrics": "per selected case, the selected metrics not measured on it, with "
                            "the reason (the image shapes' flow metrics: a few cases only)",
    "started": "start time, ISO 8601 (UTC)",
    "duration_s": "wall-clock seconds of the whole run",
    "complete": "false while the run is still going (results.json is rewritten after each case)",
    "flop_counting": "the FLOP convention, in words",
    "loadavg_start": "1-minute load average when the run started (a busy machine skews "
                     "multi-threaded kernels most)",
    "loadavg_end": "the same when results.json was last written",
}


def empty_row() -> dict[str, object]:
    """A row with every field of ``ROW_FIELDS`` set to None."""
    return dict.fromkeys(ROW_FIELDS)
