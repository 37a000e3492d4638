"""Backend selection and precision settings, on CPU with the GPU backends' availability mocked.

- backend="auto": the rule per device (CPU: the C++ kernels; CUDA: Triton, then the
  CUDA extension once built, else "ref" with a warning), and the measured choice
  among GPU backends (``CompiledField.select_backend``), cached per field structure;
- ``SPARSEKERN_BACKEND`` as the default of ``SparseConfig.backend``;
- ``SparseConfig.allow_tf32`` reaching the kernels' arguments (Triton and CUDA
  entry points; torch's TF32 flag around "ref" on CUDA);
- bfloat16/float16 models refused with an error naming the dtype.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sparsekern import SparseConfig, compile_sparse, field, ops
from sparsekern.activations import ACT_IDS
from sparsekern.config import BACKEND_CHOICES, cuda_matmul_precision
from sparsekern.formats import LAYOUT_DENSE
from sparsekern.masks import CompileError
from sparsekern.ref import mlp_bwd_ref, mlp_fwd_ref


@pytest.fixture(autouse=True)
def fresh_selection(monkeypatch):
    """No cached rule or measurement leaks into or out of a test; no env override."""
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    field._auto_backend.cache_clear()
    saved = dict(field._measured)
    field._measured.clear()
    yield
    field._auto_backend.cache_clear()
    field._measured.clear()
    field._measured.update(saved)


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
        assert field.resolve_backend("auto", torch.device("cuda")) == expected
    assert field.gpu_backends() == [b for b, ok in (("triton", triton), ("cuda", cuda_built))
                                    if ok]


def test_auto_on_cuda_without_gpu_backends_falls_back_to_ref_with_a_warning(monkeypatch):
    _mock_availability(monkeypatch, triton=False, cuda_built=False)
    with pytest.warns(UserWarning, match="no GPU backend is available"):
        assert field.resolve_backend("auto", torch.device("cuda")) == "ref"


def test_auto_on_cpu_is_the_cpu_extension_or_ref_with_a_warning(monkeypatch):
    _mock_availability(monkeypatch, triton=True, cuda_built=True, cpu=True)
    assert field.resolve_backend("auto", torch.device("cpu")) == "cpu"
    field._auto_backend.cache_clear()
    _mock_availability(monkeypatch, triton=True, cuda_built=True, cpu=False)
    with pytest.warns(UserWarning, match="C\\+\\+ CPU kernels could not be built"):
        assert field.resolve_backend("auto", torch.device("cpu")) == "ref"


def test_forced_backends_are_taken_as_given(monkeypatch):
    _mock_availability(monkeypatch, triton=False, cuda_built=False)
    for choice in ("ref", "cpu", "triton", "cuda"):
        assert field.resolve_backend(choice, torch.device("cuda")) == choice


def test_auto_never_builds_the_cuda_extension(monkeypatch):
    from sparsekern.backends import cuda as cuda_backend

    def no_build():
        raise AssertionError("backend='auto' started a CUDA build")

    monkeypatch.setattr(cuda_backend, "extension", no_build)
    monkeypatch.setattr(cuda_backend, "is_built", lambda: False)
    assert "cuda" not in field.gpu_backends()


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
    monkeypatch.setattr(field, "MEASURED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(field, "gpu_backends", lambda: ["triton", "cuda"])


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
        monkeypatch.setattr(field, "gpu_backends", lambda: ["triton"])
    f = _Timed(config, {"triton": 0.004, "cuda": 0.0})
    before = f.backend
    assert f.select_backend() == before and f.calls == []


def test_a_fused_field_measures_its_own_program(measured_on_cpu, monkeypatch):
    # "cpu" and "ref" stand in for the GPU backends: both run on CPU tensors.
    monkeypatch.setattr(field, "gpu_backends", lambda: ["ref", "cpu"])
    net = _mlp()
    fast = compile_sparse(net, SparseConfig(batch_hint=16))
    assert fast.tier == "fused" and fast.backend in ("ref", "cpu")
    assert len(field._measured) == 1
    key = next(iter(field._measured))
    assert key[2] == ("ref", "cpu") and key[3] == 16
    z = torch.randn(5, 3)
    torch.testing.assert_close(fast(z), net(z), rtol=1e-5, atol=1e-6)
    # Same structure: the cached choice, no second measurement entry.
    again = compile_sparse(net, SparseConfig(batch_hint=16))
    assert again.backend == fast.backend and len(field._measured) == 1


def test_moving_a_field_reselects_its_backend(monkeypatch):
    _mock_availability(monkeypatch, triton=True, cuda_built=True, cpu=True)
    fast = compile_sparse(_mlp(), SparseConfig(layout="dense"))
    assert fast.backend == "cpu"
    field._auto_backend.cache_clear()
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


# ---------------------------------------------------------------------- allow_tf32


def _program(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    widths = (3, 8, 3)
    weights = [torch.randn(widths[i + 1], widths[i], generator=gen).to(dtype) for i in range(2)]
    scales = [torch.empty(0, dtype=dtype)] * 2
    shifts = [torch.randn(n, generator=gen).to(dtype) for n in widths[1:]]
    x0 = torch.randn(3, 5, generator=gen).to(dtype)
    tan0 = torch.randn(1, 3, 5, generator=gen).to(dtype)
    probe = torch.randn(1, 3, 5, generator=gen).to(dtype)
    return [x0, tan0, probe, weights, scales, shifts, [LAYOUT_DENSE] * 2, ACT_IDS["tanh"], False]


@pytest.fixture
def recorded(monkeypatch):
    """ops' kernels replaced by the references, recording the keywords each call got."""
    calls: list[tuple[str, str, dict]] = []
    refs = {"mlp_fwd": mlp_fwd_ref, "mlp_bwd": mlp_bwd_ref}

    def kernel(name, backend, device):
        def run(*args, **kwargs):
            calls.append((name, backend, kwargs))
            return refs[name](*args)
        return run

    monkeypatch.setattr(ops, "_kernel", kernel)
    return calls


@pytest.mark.parametrize("backend", ("triton", "cuda"))
@pytest.mark.parametrize("allow_tf32", (False, True))
def test_ops_pass_allow_tf32_to_the_gpu_kernels(recorded, backend, allow_tf32):
    args = _program()
    f, div, saved = ops.mlp_fwd(*args, True, backend, allow_tf32)
    ops.mlp_bwd(torch.ones_like(f), torch.ones_like(div), *args, saved, backend, allow_tf32)
    assert recorded == [("mlp_fwd", backend, {"allow_tf32": allow_tf32}),
                        ("mlp_bwd", backend, {"allow_tf32": allow_tf32})]


def test_ops_default_is_exact_and_autograd_carries_the_setting(recorded):
    args = _program()
    x0 = args[0].clone().requires_grad_()
    ops.mlp_fwd(x0, *args[1:], True, "triton")
    assert recorded[-1][2] == {"allow_tf32": False}
    f, div, _ = ops.mlp_fwd(x0, *args[1:], True, "triton", True)
    (f.sum() + div.sum()).backward()
    assert recorded[-1] == ("mlp_bwd", "triton", {"allow_tf32": True})


@pytest.mark.parametrize("allow_tf32", (False, True))
def test_compiled_field_passes_its_config_to_the_kernels(recorded, allow_tf32):
    # backend="triton" on CPU tensors: the recorded stand-in runs instead of the kernels.
    net = _mlp()
    fast = compile_sparse(net, SparseConfig(backend="triton", layout="dense",
                                            allow_tf32=allow_tf32))
    z = torch.randn(4, 3, requires_grad=True)
    f, div = fast.forward_and_divergence(torch.tensor(0.0), z, torch.randn(4, 3))
    (f.sum() + div.sum()).backward()
    assert [(name, kw) for name, _, kw in recorded] == [
        ("mlp_fwd", {"allow_tf32": allow_tf32}), ("mlp_bwd", {"allow_tf32": allow_tf32})]
    torch.testing.assert_close(f, net(z), rtol=1e-5, atol=1e-6)


def test_ref_on_cuda_sets_torch_tf32_flag_for_the_call(monkeypatch):
    seen = []

    def precision(device, allow_tf32):
        seen.append((device.type, allow_tf32))
        return cuda_matmul_precision(device, allow_tf32)

    monkeypatch.setattr(ops, "cuda_matmul_precision", precision)
    ops.mlp_fwd(*_program(), False, "ref", True)
    assert seen == [("cpu", True)]


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


def test_allow_tf32_must_be_a_bool():
    with pytest.raises(TypeError, match="allow_tf32 must be a bool"):
        SparseConfig(allow_tf32="yes")


# ------------------------------------------------------------------- bf16 / fp16


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("tier", ("auto", "generic"))
def test_reduced_precision_models_are_refused_by_name(dtype, tier):
    net = _mlp().to(dtype)
    with pytest.raises(CompileError, match=rf"{dtype}; sparsekern computes in float32 and "
                                           r"float64 only"):
        compile_sparse(net, SparseConfig(tier=tier, backend="ref"))


@pytest.mark.parametrize("convert", (lambda m: m.half(), lambda m: m.to(torch.bfloat16)))
def test_converting_a_compiled_field_to_reduced_precision_is_refused(convert):
    fast = compile_sparse(_mlp(), SparseConfig(backend="ref"))
    with pytest.raises(TypeError, match="float32 and float64 only"):
        convert(fast)
    assert next(fast.parameters()).dtype == torch.float32, "nothing was converted"
    fast.double()  # supported conversions still work
    assert next(fast.parameters()).dtype == torch.float64
