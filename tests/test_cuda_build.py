"""The CUDA sources build for sm_80 and sm_90 without a GPU; on a GPU, both GPU backends match ref.

Without a GPU: every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 and
carries both SASS images, the C ABI of sparsekern_cuda.h (one entry per
operation, an sk_dtype argument) is exported unmangled, the torch binding
compiles against torch's headers, and CMakeLists.txt builds what the package
builds: the CUDA kernels here, and (slow) the CPU torch extension, which is then
imported and run; the CUDA extension itself needs a CUDA torch. With a GPU
(``TestOnGpu``): the "triton" and "cuda" backends, through ``sparsekern.ops`` on
CUDA tensors, against backend="ref".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from sparsekern import ops
from sparsekern.activations import ACT_IDS
from sparsekern.formats import LAYOUT_BLOCKED, LAYOUT_CSR, LAYOUT_DENSE, BlockedPattern, CSRPattern

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc" / "cuda"
COMMON = ROOT / "csrc" / "common"
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
ARCHS = (80, 90)


def _cuda_home() -> Path | None:
    """The CUDA toolkit: $CUDA_HOME, else where nvcc says it lives, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc on PATH may be a wrapper script; its dry run names the real install.
        dry = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
        top = re.search(r"^#\$ TOP=(.+)$", dry.stderr + dry.stdout, re.MULTILINE)
        if top:
            return Path(top.group(1).strip()).resolve()
    return Path("/usr/local/cuda") if Path("/usr/local/cuda/bin/nvcc").exists() else None


CUDA_HOME = _cuda_home()
NVCC = shutil.which("nvcc") or (str(CUDA_HOME / "bin" / "nvcc") if CUDA_HOME else None)


def _ci() -> bool:
    """Whether this runs in CI ($CI set to anything but "", 0, false or no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_tool(reason: str) -> None:
    """Skip for want of a build tool; in CI fail instead, so a compile check is never lost."""
    if _ci():
        pytest.fail(f"CI is set (CI={os.environ['CI']!r}) but {reason}: the CUDA compile "
                    "checks cannot run, and CI must not skip them", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def nvcc() -> str:
    """nvcc's path; skips without it (fails in CI)."""
    if NVCC is None or not Path(NVCC).exists():
        missing_tool("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    return NVCC


needs_nvcc = pytest.mark.usefixtures("nvcc")


def _cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the one Triton bundles with its NVIDIA backend."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    if CUDA_HOME and (CUDA_HOME / "bin" / "cuobjdump").exists():
        return str(CUDA_HOME / "bin" / "cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


@pytest.fixture(scope="module")
def objects(tmp_path_factory, nvcc) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Each .cu compiled once to a host object with sm_80 and sm_90 SASS embedded."""
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    built = {}
    for name in CU_FILES:
        obj = out_dir / (Path(name).stem + ".o")
        proc = subprocess.run(
            [nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", *gencode, "-I", str(CSRC), "-c",
             str(CSRC / name), "-o", str(obj)],
            capture_output=True, text=True,
        )
        built[name] = (proc, obj)
    return built


@needs_nvcc
@pytest.mark.parametrize("name", CU_FILES)
def test_cu_file_compiles_for_sm80_and_sm90(objects, name):
    proc, obj = objects[name]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "warning" not in proc.stderr.lower(), proc.stderr[-4000:]
    cuobjdump = _cuobjdump()
    if cuobjdump is not None:
        listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True,
                                 text=True, check=True).stdout
        for arch in ARCHS:
            assert f".sm_{arch}.cubin" in listing, listing


@needs_nvcc
def test_c_abi_is_exported_unmangled(objects):
    nm = shutil.which("nm")
    assert nm, "binutils' nm is needed (it comes with the C++ toolchain)"
    header = (CSRC / "sparsekern_cuda.h").read_text()
    declared = set(re.findall(r"\b(sk_\w+)\(", header))
    assert {"sk_csr_spmm", "sk_blocked_spmm", "sk_csr_sddmm", "sk_mlp_epilogue_fwd",
            "sk_mlp_head_fwd", "sk_mlp_epilogue_bwd", "sk_fused_mlp_fwd"} <= declared
    # One entry per operation: the element type is an argument, not a second symbol.
    assert not {n for n in declared if re.search(r"_f(32|64)$", n)}, sorted(declared)
    for name in declared - {"sk_error_string"}:
        assert re.search(rf"\b{name}\(sk_dtype dtype,", header), name
    exported = set()
    for proc, obj in objects.values():
        assert proc.returncode == 0, proc.stderr[-2000:]
        symbols = subprocess.run([nm, "-g", "--defined-only", str(obj)], capture_output=True,
                                 text=True, check=True).stdout
        exported |= {line.split()[-1] for line in symbols.splitlines() if " T " in line}
    assert declared <= exported, sorted(declared - exported)


def test_torch_binding_compiles_against_torch_headers(tmp_path):
    """binding.cpp (torch C++ API + the C ABI) passes the C++ compiler's front end.

    CPU builds of torch ship c10/cuda headers but not the one header CMake
    generates for CUDA builds (c10/cuda/impl/cuda_cmake_macros.h); a stub with
    its one definition stands in for it. Linking needs a CUDA torch (GPU class).
    """
    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    home = CUDA_HOME
    if cxx is None or home is None or not (home / "include" / "cuda_runtime_api.h").exists():
        missing_tool("the torch binding check needs a C++ compiler and the CUDA toolkit "
                     f"headers (compiler: {cxx}, toolkit: {home})")
    torch_inc = [Path(p) for p in include_paths()]
    if not (torch_inc[0] / "c10" / "cuda" / "CUDAStream.h").exists():
        missing_tool(f"this torch install has no c10/cuda headers under {torch_inc[0]}")
    stub = tmp_path / "stub"
    macros = stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in (stub, *torch_inc, home / "include", CSRC,
                                   sysconfig.get_paths()["include"])]
    # The common headers (the program decode and the layer loops) are ours too.
    own_files = "|".join(re.escape(p.name) for p in
                         (CSRC / "binding.cpp", CSRC / "sparsekern_cuda.h", *COMMON.glob("*.h")))
    proc = subprocess.run(
        [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-DTORCH_EXTENSION_NAME=sk_check",
         *includes, str(CSRC / "binding.cpp")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    own = [line for line in proc.stderr.splitlines()
           if re.match(rf".*({own_files}):\d+:\d+: (warning|error)", line)]
    assert not own, "\n".join(own)


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory, nvcc) -> tuple[str, Path, dict[str, str]]:
    """CMakeLists.txt configured once (cmake, build folder, environment); nothing built yet."""
    cmake = shutil.which("cmake")
    if cmake is None:
        missing_tool("cmake was not found")
    env = dict(os.environ, CUDACXX=nvcc)
    build = tmp_path_factory.mktemp("cmake") / "build"
    proc = subprocess.run([cmake, "-S", str(ROOT), "-B", str(build),
                           f"-DPython3_EXECUTABLE={sys.executable}"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cmake, build, env


def _cmake_target(cmake_build, target: str) -> Path:
    cmake, build, env = cmake_build
    proc = subprocess.run([cmake, "--build", str(build), "-j2", "--target", target],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return build


def test_cmake_builds_the_cuda_kernels(cmake_build):
    build = _cmake_target(cmake_build, "sparsekern_cuda_kernels")
    lib = build / "libsparsekern_cuda_kernels.a"
    assert lib.exists()
    cuobjdump = _cuobjdump()
    if cuobjdump is not None:
        listing = subprocess.run([cuobjdump, "--list-elf", str(lib)], capture_output=True,
                                 text=True, check=True).stdout
        for name in CU_FILES:
            for arch in ARCHS:
                assert f"{Path(name).stem}.sm_{arch}.cubin" in listing, listing


@pytest.mark.slow
def test_cmake_builds_the_cpu_extension_the_package_builds(cmake_build):
    """The CPU torch extension from CMakeLists.txt imports and runs the fused program.

    Only the CPU target (about two minutes on two cores); the CUDA extension
    target needs a CUDA build of torch, which the GPU checks have.
    """
    import importlib.util

    build = _cmake_target(cmake_build, "sparsekern_cpu")
    (so,) = build.glob("sparsekern_cpu*.so")
    spec = importlib.util.spec_from_file_location("sparsekern_cpu", so)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    gen = torch.Generator().manual_seed(0)
    w0, w1 = (torch.randn(5, 3, generator=gen, dtype=torch.float64),
              torch.randn(3, 5, generator=gen, dtype=torch.float64))
    b0, b1 = torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    x0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    none = torch.empty(0, dtype=torch.float64)
    f, div, _ = ext.mlp_fwd(x0, torch.empty(0, 3, 4, dtype=torch.float64), none, [w0, w1], [],
                            [none, none], [b0, b1], [LAYOUT_DENSE, LAYOUT_DENSE], ACT_IDS["tanh"],
                            False, False)
    want = w1 @ torch.tanh(w0 @ x0 + b0[:, None]) + b1[:, None]
    assert torch.allclose(f, want, rtol=1e-12, atol=1e-12)
    assert div.shape == (4,) and not div.any()


def test_cuda_backend_without_cuda_torch_says_why():
    from sparsekern.backends import cuda

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the extension builds (TestOnGpu)")
    with pytest.raises(RuntimeError, match="needs a CUDA build of torch and a visible GPU"):
        cuda.extension()
    assert cuda.available() is False


# --------------------------------------------------------------------------- on a GPU


def _pattern(rows: int, cols: int, density: float, seed: int) -> CSRPattern:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=gen) < density
    if rows > 2 and cols > 2:
        mask[rows // 2] = False
        mask[:, cols // 3] = False
    return CSRPattern.from_mask(mask)


def _program(widths, layouts, density, mode, b, act, dtype, seed=0):
    """Arguments of ops.mlp_fwd (up to ``exact``) on the CPU: (values, index, layouts)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    values, index, scales, shifts = [], [], [], []
    for i, code in enumerate(layouts):
        w = rnd(widths[i + 1], widths[i]) / widths[i] ** 0.5
        if code in (LAYOUT_CSR, LAYOUT_BLOCKED):
            p = _pattern(widths[i + 1], widths[i], density, seed + i)
            values.append(w[p.mask()])
            index += p.tensors()
            if code == LAYOUT_BLOCKED:
                index += BlockedPattern.from_csr(p).tensors()
        else:
            values.append(w)
        scales.append(rnd(widths[i + 1]) if i % 2 == 0 else torch.empty(0, dtype=dtype))
        shifts.append(rnd(widths[i + 1]))
    d = widths[-1]
    x0 = rnd(widths[0], b)
    k = {"exact": d, "hutchinson": 1, "none": 0}[mode]
    tan0 = rnd(k, widths[0], b)
    probe = rnd(k, d, b) if mode == "hutchinson" else torch.empty(0, dtype=dtype)
    return [x0, tan0, probe, values, index, scales, shifts, list(layouts), ACT_IDS[act],
            mode == "exact"]


def _map(args, fn):
    """Apply fn to every tensor of an argument list (tensors and lists of tensors)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = fn(a)
        elif isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            a = [fn(t) for t in a]
        out.append(a)
    return out


def _to(args, device):
    return _map(args, lambda t: t.to(device))


def _close(got: torch.Tensor, ref: torch.Tensor, what: str, factor: float = 1.0) -> None:
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[ref.dtype] * factor
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    err = (got.double().cpu() - ref.double().cpu()).norm() / max(ref.double().norm(), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


GPU_BACKENDS = ("triton", "cuda")
PROGRAMS = [
    # (widths, layouts, density, mode, batch, act, dtype)
    ((2, 64, 64, 64, 2), [LAYOUT_DENSE] * 4, 1.0, "hutchinson", 1024, "sigmoid", torch.float32),
    ((2, 64, 64, 64, 2), [LAYOUT_DENSE] * 4, 1.0, "exact", 1025, "tanh", torch.float64),
    ((6, 60, 60, 60, 6), [LAYOUT_DENSE] * 4, 1.0, "hutchinson", 37, "tanh", torch.float32),
    ((8, 160, 160, 160, 8), [LAYOUT_DENSE] * 4, 1.0, "none", 1, "softplus", torch.float32),
    ((43, 300, 43), [LAYOUT_DENSE] * 2, 1.0, "hutchinson", 1000, "softplus", torch.float32),
    ((21, 210, 210, 21), [LAYOUT_CSR, LAYOUT_DENSE, LAYOUT_CSR], 0.05, "exact", 37, "elu",
     torch.float64),
    ((3, 59, 37, 3), [LAYOUT_CSR] * 3, 0.5, "hutchinson", 1025, "swish", torch.float32),
    ((5, 61, 43, 5), [LAYOUT_BLOCKED, LAYOUT_CSR, LAYOUT_BLOCKED], 0.3, "exact", 64, "relu",
     torch.float64),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestOnGpu:
    """The GPU backends through the op registry, against backend='ref' on the same GPU."""

    @pytest.mark.parametrize("backend", GPU_BACKENDS)
    @pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
    @pytest.mark.parametrize("density", (0.0, 0.5, 0.9, 0.99, 1.0))
    @pytest.mark.parametrize("n", (1, 37, 1025))
    def test_sparse_ops(self, backend, dtype, density, n):
        cpu_pattern = _pattern(59, 37, density, n)
        p = CSRPattern.from_tensors([t.cuda() for t in cpu_pattern.tensors()])
        blocks = [t.cuda() for t in BlockedPattern.from_csr(cpu_pattern).tensors()]
        gen = torch.Generator().manual_seed(n)
        vals = torch.randn(p.nnz, generator=gen, dtype=torch.float64).to(dtype).cuda()
        x = torch.randn(37, n, generator=gen, dtype=torch.float64).to(dtype).cuda()
        g = torch.randn(59, n, generator=gen, dtype=torch.float64).to(dtype).cuda()
        for tr, inp in ((False, x), (True, g)):
            y = ops.spmm(*p.tensors(), vals, inp, tr, backend)
            assert y.is_cuda and y.is_contiguous()
            _close(y, ops.spmm(*p.tensors(), vals, inp, tr, "ref"), f"spmm transpose={tr}")
        _close(ops.spmm_blocked(*p.tensors(), vals, *blocks, x, backend),
               ops.spmm_blocked(*p.tensors(), vals, *blocks, x, "ref"), "spmm_blocked")
        _close(ops.sddmm(*p.tensors(), g, x, backend), ops.sddmm(*p.tensors(), g, x, "ref"),
               "sddmm", factor=10)

    @pytest.mark.parametrize("backend", GPU_BACKENDS)
    @pytest.mark.parametrize("case", PROGRAMS, ids=lambda c: f"{c[0]}-{c[3]}-B{c[4]}-{c[5]}")
    def test_fused_program(self, backend, case):
        args = _to(_program(*case), "cuda")
        f, div, saved = ops.mlp_fwd(*args, True, backend)
        rf, rdiv, rsaved = ops.mlp_fwd(*args, True, "ref")
        _close(f, rf, "f", 10)
        _close(div, rdiv, "div", 100)
        for i, (s, r) in enumerate(zip(saved, rsaved, strict=True)):
            _close(s, r, f"saved[{i}]", 10)
        gen = torch.Generator().manual_seed(3)
        gf = torch.randn(f.shape, generator=gen, dtype=torch.float64).to(f.dtype).cuda()
        gd = torch.randn(div.shape, generator=gen, dtype=torch.float64).to(f.dtype).cuda()
        got = ops.mlp_bwd(gf, gd, *args, saved, backend)
        ref = ops.mlp_bwd(gf, gd, *args, rsaved, "ref")
        _close(got[0], ref[0], "grad x0", 100)
        for k in (1, 2, 3):
            for g, r in zip(got[k], ref[k], strict=True):
                _close(g, r, f"gradient group {k}", 100)

    @pytest.mark.parametrize("backend", GPU_BACKENDS)
    def test_fp32_products_stay_exact_when_tf32_is_on_globally(self, backend):
        # With TF32, a 300-wide layer is off by ~1e-3; exact products stay near 1e-6.
        args = _to(_program((43, 300, 300, 43), [LAYOUT_DENSE] * 3, 1.0, "hutchinson", 512,
                            "tanh", torch.float32), "cuda")
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            f, div, _ = ops.mlp_fwd(*args, False, backend)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
        # The same fp32 inputs, multiplied in float64.
        exact = _map(args, lambda t: t.double() if t.is_floating_point() else t)
        rf, rdiv, _ = ops.mlp_fwd(*exact, False, "ref")
        _close(f.double(), rf, "f under global TF32", 1e7)  # fp64 tolerance 1e-12 * 1e7 = 1e-5
        _close(div.double(), rdiv, "div under global TF32", 1e7)

    @pytest.mark.parametrize("backend", GPU_BACKENDS)
    def test_tf32_reaches_the_gpu_products(self, backend):
        # Asked for (SparseConfig.precision="tf32" -> ops' precision), TF32 shows as ~1e-3
        # error on a 300-wide layer (cuBLAS in both backends); by default products are exact.
        args = _to(_program((43, 300, 300, 43), [LAYOUT_DENSE] * 3, 1.0, "hutchinson", 512,
                            "tanh", torch.float32), "cuda")
        exact = _map(args, lambda t: t.double() if t.is_floating_point() else t)
        rf, _, _ = ops.mlp_fwd(*exact, False, "ref")

        def err(f):
            return ((f.double() - rf).norm() / rf.norm()).item()

        assert err(ops.mlp_fwd(*args, False, backend)[0]) < 1e-5
        assert err(ops.mlp_fwd(*args, False, backend, "tf32")[0]) > 2e-5

    @pytest.mark.parametrize("precision", ("bf16", "fp16"))
    @pytest.mark.parametrize("case", [PROGRAMS[0], PROGRAMS[2], PROGRAMS[6]],
                             ids=("toy", "60-wide", "csr"))
    def test_reduced_precision_on_tensor_cores_matches_the_rounding_reference(self, precision,
                                                                               case):
        # Triton's bf16/fp16 tl.dot (the fused kernel) or rounded operands (the general
        # path) against "ref" rounding the same operands: equal up to the order of the
        # float32 sums, which can move an activation across a rounding boundary.
        args = _to(_program(*case), "cuda")
        tol = {"bf16": 2.0 ** -9, "fp16": 2.0 ** -12}[precision] / 1e-5  # in _close's units
        f, div, saved = ops.mlp_fwd(*args, True, "triton", precision)
        rf, rdiv, rsaved = ops.mlp_fwd(*args, True, "ref", precision)
        ief, _, _ = ops.mlp_fwd(*args, True, "ref")
        _close(f, rf, "f", tol)
        _close(div, rdiv, "div", tol)
        assert (f - rf).norm() < 0.1 * (f - ief).norm(), "f follows the rounded products"
        gf, gd = torch.ones_like(f), torch.ones_like(div)
        got = ops.mlp_bwd(gf, gd, *args, saved, "triton", precision)
        ref = ops.mlp_bwd(gf, gd, *args, rsaved, "ref", precision)
        _close(got[0], ref[0], "grad x0", tol)
        for g, r in zip(got[1], ref[1], strict=True):
            _close(g, r, "weight grad", tol)

    def test_auto_backend_is_a_gpu_backend_and_correct(self):
        from torch import nn

        from sparsekern import SparseConfig, backends, compile_sparse

        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                            nn.Linear(64, 2)).cuda()
        found = backends.candidates("cuda")
        assert found, "triton or the CUDA extension must be usable on a GPU"
        fast = compile_sparse(net, SparseConfig(batch_hint=256))  # measured among `found`
        assert fast.backend in found
        z = torch.randn(256, 2, device="cuda")
        with torch.no_grad():
            _close(fast(z), net(z), "f with backend='auto'", 10)
        rule = compile_sparse(net, SparseConfig(autotune=False))
        assert rule.backend == found[0]

    @pytest.mark.parametrize("backend", GPU_BACKENDS)
    def test_opcheck(self, backend):
        p = CSRPattern.from_tensors([t.cuda() for t in _pattern(7, 5, 0.5, 4).tensors()])
        gen = torch.Generator().manual_seed(4)
        vals = torch.randn(p.nnz, generator=gen, dtype=torch.float64).cuda().requires_grad_()
        x = torch.randn(5, 9, generator=gen, dtype=torch.float64).cuda().requires_grad_()
        g = torch.randn(7, 9, generator=gen, dtype=torch.float64).cuda().requires_grad_()
        torch.library.opcheck(ops.spmm, (*p.tensors(), vals, x, False, backend))
        torch.library.opcheck(ops.sddmm, (*p.tensors(), g, x, backend))
        args = _to(_program((3, 16, 3), [LAYOUT_CSR, LAYOUT_DENSE], 0.5, "hutchinson", 5, "tanh",
                            torch.float64), "cuda")
        torch.library.opcheck(ops.mlp_fwd, (*args, True, backend))
        assert torch.autograd.gradcheck(
            lambda v, a: ops.spmm(*p.tensors(), v, a, False, backend), (vals, x))
