"""Backend selection and precision settings, on CPU with the GPU backends' availability mocked.

- backend="auto": the rule per device (CPU: the C++ kernels; CUDA: Triton, then the
  CUDA extension once built, else "ref" with a warning), and the measured choice
  among GPU backends (``CompiledField.select_backend``), cached per field structure;
- ``SPARSEKERN_BACKEND`` as the default of ``SparseConfig.backend``;
- ``SparseConfig.precision`` reaching the kernels' arguments (Triton and CUDA
  entry points; torch's TF32 flag around "ref" on CUDA), the backends "auto"
  picks for bf16/fp16 products, and what refuses them (the cpu and cuda
  kernels, the generic tier, float64 models);
- bfloat16/float16 models refused with an error naming the dtype.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sparsekern import SparseConfig, autotune, backends, compile_sparse, field, ops
from sparsekern.activations import ACT_IDS
from sparsekern.config import BACKEND_CHOICES
from sparsekern.formats import LAYOUT_DENSE
from sparsekern.masks import CompileError
from sparsekern.precision import cuda_matmul_precision
from sparsekern.ref import mlp_bwd_ref, mlp_fwd_ref


@pytest.fixture(autouse=True)
def fresh_selection(monkeypatch):
    """No cached rule or measurement leaks into or out of a test; no env override."""
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    backends.clear_cache()
    saved = dict(autotune.MEASURED)
    autotune.MEASURED.clear()
    yield
    backends.clear_cache()
    autotune.MEASURED.clear()
    autotune.MEASURED.update(saved)


def _mock_availability(monkeypatch, *, triton: bool, cuda_built: bool, cpu: bool = True) -> None:
    from sparsekern import triton as triton_backend
    from sparsekern.backends import cpu as cpu_backend
    from sparsekern.backends import cuda as cuda_backend

    monkeypatch.setattr(triton_backend, "available", lambda: triton)
    monkeypatch.setattr(cuda_backend, "is_built", lambda: cuda_built)
    monkeypatch.setattr(cuda_backend, "available", lambda: cuda_built)
    monkeypatch.setattr(cpu_backend, "available", lambda: cpu)


def _mlp(d: int = 3, width: int = 8, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                        nn.Linear(width, d)).to(dtype)
    with torch.no_grad():
        net[2].weight[torch.rand(width, width) < 0.5] = 0.0
    return net


# ------------------------------------------------------------------------ the rule


@pytest.mark.parametrize(("triton", "cuda_built", "expected"), [
    (True, True, "triton"),
    (True, False, "triton"),
    (False, True, "cuda"),
])
def test_auto_on_cuda_takes_the_first_available_gpu_backend(monkeypatch, triton, cuda_built,
                                                            expected):
    _mock_availability(monkeypatch, triton=triton, cuda_built=cuda_built)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", torch.device("cuda")) == expected
    assert backends.candidates("cuda") == [b for b, ok in (("triton", triton), ("cuda", cuda_built))
                                    if ok]


def test_auto_on_cuda_without_gpu_backends_falls_back_to_ref_with_a_warning(monkeypatch):
    _mock_availability(monkeypatch, triton=False, cuda_built=False)
    with pytest.warns(UserWarning, match="no GPU backend for precision='ieee' is ready"):
        assert backends.resolve("auto", torch.device("cuda")) == "ref"


def test_auto_on_cpu_is_the_cpu_extension_or_ref_with_a_warning(monkeypatch):
    _mock_availability(monkeypatch, triton=True, cuda_built=True, cpu=True)
    assert backends.resolve("auto", torch.device("cpu")) == "cpu"
    backends.clear_cache()
    _mock_availability(monkeypatch, triton=True, cuda_built=True, cpu=False)
    with pytest.warns(UserWarning, match="C\\+\\+ CPU kernels could not be built"):
        assert backends.resolve("auto", torch.device("cpu")) == "ref"


def test_auto_on_cpu_falls_back_to_ref_when_the_build_fails(monkeypatch):
    # The toolchain is there, but the build breaks (a compiler error): "auto" says why
    # and runs the reference, rather than failing the first call.
    from sparsekern.backends import cpu as cpu_backend

    builds = []

    def broken():
        builds.append(1)
        raise RuntimeError("ninja: build stopped: subcommand failed")

    monkeypatch.setattr(cpu_backend, "available", lambda: True)
    monkeypatch.setattr(cpu_backend, "extension", broken)
    with pytest.warns(UserWarning, match=r"C\+\+ CPU kernels could not be built "
                                         r"\(RuntimeError: ninja: build stopped"):
        assert backends.resolve("auto", torch.device("cpu")) == "ref"
    assert len(builds) == 1, "a failing build (a minute of ninja) is tried once, not again"


def test_forced_backends_are_taken_as_given(monkeypatch):
    _mock_availability(monkeypatch, triton=False, cuda_built=False)
    for choice in ("ref", "cpu", "triton", "cuda"):
        assert backends.resolve(choice, torch.device("cuda")) == choice


def test_auto_never_builds_the_cuda_extension(monkeypatch):
    from sparsekern.backends import cuda as cuda_backend

    def no_build():
        raise AssertionError("backend='auto' started a CUDA build")

    monkeypatch.setattr(cuda_backend, "extension", no_build)
    monkeypatch.setattr(cuda_backend, "is_built", lambda: False)
    assert "cuda" not in backends.candidates("cuda")


def test_cuda_is_built_is_false_without_a_cuda_torch():
    from sparsekern.backends import cuda as cuda_backend

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cuda_backend.is_built() is False


# --------------------------------------------------------------- the measured choice


class _Timed(field.CompiledField):
    """A field whose speed per backend is given: the measurement's subject."""

    tier = "test"

    def __init__(self, config: SparseConfig, cost: dict[str, float], fail=()) -> None:
        super().__init__(nn.Linear(2, 2), config)
        self.weight = nn.Parameter(torch.zeros(2))
        self.cost, self.fail, self.calls = cost, set(fail), []

    def _backend_key(self):
        return ("timed", tuple(sorted(self.cost.items())))

    def _sample_call(self, batch, generator):
        z = torch.randn(batch, 2, generator=generator)
        return None, z, torch.randn(batch, 2, generator=generator)

    def forward_and_divergence(self, t, z, noise=None):
        self.calls.append(self.backend)
        if self.backend in self.fail:
            raise RuntimeError(f"{self.backend} broke")
        # A deterministic "duration": spin the clock for the backend's cost.
        import time

        end = time.perf_counter() + self.cost[self.backend]
        while time.perf_counter() < end:
            pass
        return z, z.sum(1)


@pytest.fixture
def measured_on_cpu(monkeypatch):
    """Measure on CPU tensors too, with two GPU backends "available"."""
    monkeypatch.setattr(backends, "MEASURED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(backends, "candidates",
                        lambda device_type, precision="ieee": ["triton", "cuda"])


def test_measured_choice_takes_the_fastest_once_and_caches_it(measured_on_cpu):
    config = SparseConfig(batch_hint=4)
    f = _Timed(config, {"triton": 0.004, "cuda": 0.0005})
    assert f.select_backend() == "cuda" and f.backend == "cuda"
    assert set(f.calls) == {"triton", "cuda"}
    g = _Timed(config, {"triton": 0.004, "cuda": 0.0005})
    assert g.select_backend() == "cuda"
    assert g.calls == [], "the second field of the same structure reuses the measurement"


def test_a_failing_backend_is_left_out_with_a_warning(measured_on_cpu):
    config = SparseConfig(batch_hint=4)
    f = _Timed(config, {"triton": 0.0, "cuda": 0.001}, fail={"triton"})
    with pytest.warns(UserWarning, match="backend 'triton' failed"):
        assert f.select_backend() == "cuda"


@pytest.mark.parametrize("why", ("autotune off", "forced", "one candidate"))
def test_no_measurement_keeps_the_deterministic_rule(measured_on_cpu, monkeypatch, why):
    config = SparseConfig(backend="ref" if why == "forced" else "auto", batch_hint=4,
                          autotune=why != "autotune off")
    if why == "one candidate":
        monkeypatch.setattr(backends, "candidates",
                            lambda device_type, precision="ieee": ["triton"])
    f = _Timed(config, {"triton": 0.004, "cuda": 0.0})
    before = f.backend
    assert f.select_backend() == before and f.calls == []


def test_a_fused_field_measures_its_own_program(measured_on_cpu, monkeypatch):
    # "cpu" and "ref" stand in for the GPU backends: both run on CPU tensors.
    monkeypatch.setattr(backends, "candidates",
                        lambda device_type, precision="ieee": ["ref", "cpu"])
    net = _mlp()
    fast = compile_sparse(net, SparseConfig(batch_hint=16))
    assert fast.tier == "fused" and fast.backend in ("ref", "cpu")
    # One backend measurement (the table also holds the layouts measured on the way).
    measured = [k for k in autotune.MEASURED if k[0] == "backend"]
    assert len(measured) == 1
    key = measured[0]
    assert key[3] == ("ref", "cpu") and key[4] == 16
    z = torch.randn(5, 3)
    torch.testing.assert_close(fast(z), net(z), rtol=1e-5, atol=1e-6)
    # Same structure: the cached choice, no second measurement entry.
    again = compile_sparse(net, SparseConfig(batch_hint=16))
    assert again.backend == fast.backend
    assert [k for k in autotune.MEASURED if k[0] == "backend"] == measured


def test_moving_a_field_reselects_its_backend(monkeypatch):
    _mock_availability(monkeypatch, triton=True, cuda_built=True, cpu=True)
    fast = compile_sparse(_mlp(), SparseConfig(layout="dense"))
    assert fast.backend == "cpu"
    backends.clear_cache()
    _mock_availability(monkeypatch, triton=True, cuda_built=True, cpu=False)
    with pytest.warns(UserWarning, match="could not be built"):
        fast.double()  # a conversion re-resolves "auto" for the (new) dtype and device
    assert fast.backend == "ref"


# ----------------------------------------------------------------- SPARSEKERN_BACKEND


def test_env_var_is_the_default_backend(monkeypatch):
    assert SparseConfig().backend == "auto"
    for value in BACKEND_CHOICES:
        monkeypatch.setenv("SPARSEKERN_BACKEND", value)
        assert SparseConfig().backend == value
    monkeypatch.setenv("SPARSEKERN_BACKEND", "ref")
    assert SparseConfig(backend="cpu").backend == "cpu", "an explicit backend wins"
    monkeypatch.setenv("SPARSEKERN_BACKEND", "")
    assert SparseConfig().backend == "auto"


def test_env_var_forces_the_backend_of_compiled_fields(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_BACKEND", "ref")
    fast = compile_sparse(_mlp())
    assert fast.backend == "ref"


def test_invalid_env_var_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_BACKEND", "fortran")
    with pytest.raises(ValueError, match=r"SPARSEKERN_BACKEND='fortran' is not a sparsekern "
                                         r"backend; expected one of"):
        SparseConfig()


# ----------------------------------------------------------------------- precision


def _program(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    widths = (3, 8, 3)
    weights = [torch.randn(widths[i + 1], widths[i], generator=gen).to(dtype) for i in range(2)]
    scales = [torch.empty(0, dtype=dtype)] * 2
    shifts = [torch.randn(n, generator=gen).to(dtype) for n in widths[1:]]
    x0 = torch.randn(3, 5, generator=gen).to(dtype)
    tan0 = torch.randn(1, 3, 5, generator=gen).to(dtype)
    probe = torch.randn(1, 3, 5, generator=gen).to(dtype)
    # Dense layers: one value tensor each, no index tensors.
    return [x0, tan0, probe, weights, [], scales, shifts, [LAYOUT_DENSE] * 2, ACT_IDS["tanh"],
            False]


@pytest.fixture
def recorded(monkeypatch):
    """ops' kernels replaced by the references, recording the keywords each call got."""
    calls: list[tuple[str, str, dict]] = []
    refs = {"mlp_fwd": mlp_fwd_ref, "mlp_bwd": mlp_bwd_ref}

    def kernel(name, backend, device):
        def run(*args, **kwargs):
            calls.append((name, backend, kwargs))
            return refs[name](*args, precision=kwargs.get("precision", "ieee"))
        return run

    monkeypatch.setattr(ops, "kernel", kernel)
    return calls


# What each backend's MLP entry points receive for a precision: Triton and "ref" the
# precision itself, the CUDA extension TF32 on or off, the C++ CPU kernels nothing.
_RECEIVES = {
    ("triton", "ieee"): {"precision": "ieee"}, ("triton", "tf32"): {"precision": "tf32"},
    ("triton", "bf16"): {"precision": "bf16"}, ("triton", "fp16"): {"precision": "fp16"},
    ("ref", "bf16"): {"precision": "bf16"}, ("ref", "tf32"): {"precision": "tf32"},
    ("cuda", "ieee"): {"allow_tf32": False}, ("cuda", "tf32"): {"allow_tf32": True},
    ("cpu", "ieee"): {}, ("cpu", "tf32"): {},
}


@pytest.mark.parametrize(("backend", "precision"), sorted(_RECEIVES))
def test_ops_pass_the_precision_to_the_kernels(recorded, backend, precision):
    args = _program()
    f, div, saved = ops.mlp_fwd(*args, True, backend, precision)
    ops.mlp_bwd(torch.ones_like(f), torch.ones_like(div), *args, saved, backend, precision)
    expected = _RECEIVES[backend, precision]
    assert recorded == [("mlp_fwd", backend, expected), ("mlp_bwd", backend, expected)]


@pytest.mark.parametrize("backend", ("cpu", "cuda"))
@pytest.mark.parametrize("precision", ("bf16", "fp16"))
def test_ops_refuse_reduced_precision_on_exact_only_backends(recorded, backend, precision):
    with pytest.raises(ValueError, match=rf"backend '{backend}' has no {precision} products"):
        ops.mlp_fwd(*_program(), True, backend, precision)
    assert not recorded


def test_ops_refuse_an_unknown_precision(recorded):
    with pytest.raises(ValueError, match=r"precision='bf8'; expected one of \('ieee'"):
        ops.mlp_fwd(*_program(), True, "triton", "bf8")


def test_ops_default_is_exact_and_autograd_carries_the_setting(recorded):
    args = _program()
    x0 = args[0].clone().requires_grad_()
    ops.mlp_fwd(x0, *args[1:], True, "triton")
    assert recorded[-1][2] == {"precision": "ieee"}
    f, div, _ = ops.mlp_fwd(x0, *args[1:], True, "triton", "bf16")
    (f.sum() + div.sum()).backward()
    assert recorded[-1] == ("mlp_bwd", "triton", {"precision": "bf16"})


@pytest.mark.parametrize("precision", ("ieee", "tf32", "bf16"))
def test_compiled_field_passes_its_config_to_the_kernels(recorded, precision):
    # backend="triton" on CPU tensors: the recorded stand-in (the reference) runs instead.
    net = _mlp()
    fast = compile_sparse(net, SparseConfig(backend="triton", layout="dense",
                                            precision=precision))
    z = torch.randn(4, 3, requires_grad=True)
    f, div = fast.forward_and_divergence(torch.tensor(0.0), z, torch.randn(4, 3))
    (f.sum() + div.sum()).backward()
    assert [(name, kw) for name, _, kw in recorded] == [
        ("mlp_fwd", {"precision": precision}), ("mlp_bwd", {"precision": precision})]
    # bf16 operands: about 2^-8 relative per product; exact otherwise.
    tol = 2e-2 if precision == "bf16" else 1e-5
    torch.testing.assert_close(f, net(z), rtol=tol, atol=tol)


@pytest.mark.parametrize("precision", ("bf16", "fp16"))
def test_the_graph_path_rounds_products_as_the_op_does(precision):
    # forward() with a graph to record runs PyTorch, not the op: f and every gradient
    # must come out as mlp_fwd/mlp_bwd give them (rounded operands and cotangents,
    # float32 results), not as torch's casts would (rounded gradients).
    net = _mlp(width=37)
    fast = compile_sparse(net, SparseConfig(backend="ref", layout="dense", precision=precision))
    gen = torch.Generator().manual_seed(1)
    z, g = torch.randn(16, 3, generator=gen), torch.randn(16, 3, generator=gen)

    def grads(run):
        fast.zero_grad()
        zz = z.clone().requires_grad_()
        f = run(zz)
        (f * g).sum().backward()
        return f.detach(), [zz.grad, *[p.grad.clone() for p in fast.parameters()]]

    f_graph, g_graph = grads(fast)
    f_op, g_op = grads(lambda zz: fast.forward_and_divergence(None, zz, torch.ones_like(zz))[0])
    torch.testing.assert_close(f_graph, f_op, rtol=1e-6, atol=1e-6)
    # The two sum in other orders, so a cotangent can round to its neighbour now and then.
    unit = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}[precision]
    for a, b in zip(g_graph, g_op, strict=True):
        assert ((a - b).norm() / b.norm()).item() < unit / 8
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert any(not torch.equal(t, t.to(low).float()) for t in g_graph), (
        "float32 gradients, not gradients rounded to the operand type")
    assert (f_graph - net(z)).abs().max() > unit * 1e-2, f"{precision} operands change f"


def _record_tf32_scopes(monkeypatch, module) -> list[tuple[str, bool]]:
    """(device type, allow_tf32) of every torch TF32 scope ``module`` opens, in order."""
    seen: list[tuple[str, bool]] = []

    def scope(device, allow_tf32):
        seen.append((device.type, allow_tf32))
        return cuda_matmul_precision(device, allow_tf32)

    monkeypatch.setattr(module, "cuda_matmul_precision", scope)
    return seen


@pytest.mark.parametrize("precision", ("ieee", "tf32", "bf16"))
def test_ref_on_cuda_sets_torch_tf32_flag_for_the_call(monkeypatch, precision):
    seen = _record_tf32_scopes(monkeypatch, ops)
    ops.mlp_fwd(*_program(), False, "ref", precision)
    # bf16 operands are exact in TF32, so cuBLAS may use it: same products, faster.
    assert seen == [("cpu", precision != "ieee")]


@pytest.mark.parametrize("precision", ("ieee", "tf32"))
def test_the_generic_tier_sets_torch_tf32_flag_as_configured(monkeypatch, precision):
    from sparsekern import generic

    seen = _record_tf32_scopes(monkeypatch, generic)
    fast = compile_sparse(_mlp(), SparseConfig(tier="generic", precision=precision))
    z = torch.randn(4, 3)
    fast(z)
    fast.forward_and_divergence(None, z, torch.randn(4, 3))
    # The call itself, then the divergence around its call (which enters it again).
    assert seen == [("cpu", precision == "tf32")] * 3


def test_cuda_matmul_precision_sets_and_restores_the_flag():
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        with cuda_matmul_precision(torch.device("cuda"), False):
            assert matmul.allow_tf32 is False
        assert matmul.allow_tf32 is True
        with cuda_matmul_precision(torch.device("cpu"), False):
            assert matmul.allow_tf32 is True, "CPU products have no TF32: flag left alone"
    finally:
        matmul.allow_tf32 = before


def test_precision_must_be_known():
    with pytest.raises(ValueError, match=r"SparseConfig.precision='half'; expected one of"):
        SparseConfig(precision="half")


@pytest.mark.parametrize("backend", ("cpu", "cuda"))
def test_reduced_precision_on_an_exact_only_backend_is_refused_in_the_config(backend,
                                                                              monkeypatch):
    with pytest.raises(ValueError, match=rf"precision='bf16', backend='{backend}'\): the "
                                         rf"{backend} kernels compute exact float32 products"):
        SparseConfig(precision="bf16", backend=backend)
    monkeypatch.setenv("SPARSEKERN_BACKEND", backend)
    with pytest.raises(ValueError, match=rf"backend='{backend}' \(the default from "
                                         r"\$SPARSEKERN_BACKEND\)\)"):
        SparseConfig(precision="fp16")


@pytest.mark.parametrize("precision", ("bf16", "fp16"))
def test_auto_for_reduced_precision_on_cuda_is_triton_only(monkeypatch, precision):
    _mock_availability(monkeypatch, triton=True, cuda_built=True)
    assert backends.candidates("cuda", precision) == ["triton"]
    assert backends.resolve("auto", torch.device("cuda"), precision) == "triton"
    backends.clear_cache()
    _mock_availability(monkeypatch, triton=False, cuda_built=True)
    with pytest.warns(UserWarning, match=rf"no GPU backend for precision='{precision}'"):
        assert backends.resolve("auto", torch.device("cuda"), precision) == "ref"


def test_auto_for_reduced_precision_on_cpu_is_ref_with_a_warning(monkeypatch):
    _mock_availability(monkeypatch, triton=True, cuda_built=True, cpu=True)
    with pytest.warns(UserWarning, match="precision='bf16' products have kernels on CUDA"):
        fast = compile_sparse(_mlp(), SparseConfig(precision="bf16"))
    assert fast.backend == "ref"
    fast.float()  # a conversion that keeps the device keeps the choice
    assert fast.backend == "ref"


def test_reduced_precision_needs_a_float32_model():
    with pytest.raises(CompileError, match=r"is torch.float64; SparseConfig.precision='fp16' "
                                           r"rounds the products of float32 models"):
        compile_sparse(_mlp(dtype=torch.float64), SparseConfig(precision="fp16", backend="ref"))
    fast = compile_sparse(_mlp(), SparseConfig(precision="fp16", backend="ref"))
    with pytest.raises(TypeError, match="precision='fp16' rounds the products of float32"):
        fast.double()
    assert next(fast.parameters()).dtype == torch.float32, "nothing was converted"


class _Residual(nn.Module):
    """Not a recognised MLP: the generic tier compiles it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, t, z):
        return z + torch.tanh(self.lin(z))


def test_the_generic_tier_refuses_reduced_precision():
    with pytest.raises(CompileError, match=r"precision='bf16' rounds the products of the fused "
                                           r"tier; tier='generic' was requested, whose products "
                                           r"are exact float32: .*, or tier='auto'"):
        compile_sparse(_mlp(), SparseConfig(precision="bf16", tier="generic", backend="ref"))
    with pytest.raises(CompileError, match=r"fp16' rounds the products of the fused tier; "
                                           r"_Residual is not a recognised MLP"):
        compile_sparse(_Residual(), SparseConfig(precision="fp16", backend="ref"))
    # TF32 is a permission, not a rounding rule: the generic tier takes it.
    assert compile_sparse(_mlp(), SparseConfig(precision="tf32", tier="generic")).tier == \
        "generic"


# ------------------------------------------------------------------- bf16 / fp16 models


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("tier", ("auto", "generic"))
def test_reduced_precision_models_are_refused_by_name(dtype, tier):
    net = _mlp().to(dtype)
    with pytest.raises(CompileError, match=rf"{dtype}; sparsekern models hold float32 and "
                                           r"float64 only \(for bfloat16/float16 products keep "
                                           r"the model float32 and set SparseConfig\(precision="):
        compile_sparse(net, SparseConfig(tier=tier, backend="ref"))


@pytest.mark.parametrize("convert", (lambda m: m.half(), lambda m: m.to(torch.bfloat16)))
def test_converting_a_compiled_field_to_reduced_precision_is_refused(convert):
    fast = compile_sparse(_mlp(), SparseConfig(backend="ref"))
    with pytest.raises(TypeError, match="float32 and float64 only"):
        convert(fast)
    assert next(fast.parameters()).dtype == torch.float32, "nothing was converted"
    fast.double()  # supported conversions still work
    assert next(fast.parameters()).dtype == torch.float64
