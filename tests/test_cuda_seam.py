"""The seam of qpeft/_cuda.py and the CUDA-only Python above it, run on the CPU through the fake device of
tests/fake_cuda.py: backend selection and its fallbacks for a CUDA tensor, the JIT build decisions (with a fake
compiler), the Hopper gate and the NF4 dispatch plan, the SM count behind the Triton tiles, and the device choices
of the integrations and the demo. The raw-op branches of the ops and the modules: test_cuda_seam_ops.py; the
optimizers: optim/test_optim_seam.py. docs/CUDA_SEAM.md lists every CUDA-only branch and the test that runs it."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import torch

import qpeft.ops.bottleneck  # noqa: F401  (registers the ops)
import qpeft.ops.quantize  # noqa: F401
from qpeft import _backend, _cuda, _jit
from qpeft.ops import nf4_matmul_dispatch as dispatch

from fake_cuda import A100, FakeCuda

ROOT = Path(__file__).resolve().parents[1]
DEV = torch.device("cpu")  # the pretend GPU's tensors
NOTE = ROOT / "docs" / "CUDA_SEAM.md"


# ------------------------------------------------------------------------------------------ the seam itself
def _cuda_calls(path: Path) -> list[tuple[int, str, str]]:
    """(line, enclosing function, what) for each direct use of the CUDA runtime in a source file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            f = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            what = None
            if isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name) and child.value.id == "torch" \
                    and child.attr == "cuda":
                what = "torch.cuda"
            elif isinstance(child, ast.Attribute) and child.attr == "qpeft_C":
                what = "torch.ops.qpeft_C"
            elif isinstance(child, ast.Attribute) and child.attr == "pin_memory":
                what = ".pin_memory()"
            elif isinstance(child, ast.keyword) and child.arg == "pin_memory":
                what = "pin_memory="
            elif isinstance(child, ast.Compare):
                sides = [child.left, *child.comparators]
                if any(isinstance(n, ast.Constant) and n.value == "cuda" for n in sides) and \
                        any(isinstance(n, ast.Attribute) and n.attr == "type" for n in sides):
                    what = 'device.type == "cuda"'
            if what is not None:
                found.append((child.lineno, f, what))
            visit(child, f)

    visit(tree, "<module>")
    return found


# (file, function): why it may ask CUDA directly. Nothing else may.
ALLOWED = {
    ("python/qpeft/demo/main.py", "resolve_device"): "the user's --device name, not a runtime question",
    ("python/qpeft/demo/main.py", "run"): "peak-memory statistics of a real training run (a report line)",
}


def test_only_the_seam_calls_the_cuda_runtime():
    sources = sorted([*(ROOT / "python" / "qpeft").rglob("*.py"), *(ROOT / "triton_kernels").rglob("*.py")])
    assert len(sources) > 50
    direct = [(str(p.relative_to(ROOT)), line, func, what) for p in sources if p.name != "_cuda.py"
              for line, func, what in _cuda_calls(p) if (str(p.relative_to(ROOT)), func) not in ALLOWED]
    assert direct == [], "call the CUDA runtime through qpeft._cuda.rt (tests/fake_cuda.py then runs it on the CPU)"
    # the allow-list is not stale
    used = {(str(p.relative_to(ROOT)), func) for p in sources for _, func, _ in _cuda_calls(p)}
    assert set(ALLOWED) <= used


def test_the_fake_answers_everything_the_seam_asks():
    members = {n for n in dir(_cuda.CudaRuntime) if not n.startswith("_")}
    assert members <= set(dir(FakeCuda)), members - set(dir(FakeCuda))


def test_the_real_runtime_calls_exist_in_this_torch():
    # the leaf calls of CudaRuntime (not executable without a GPU) name APIs that this torch has
    from torch.utils import cpp_extension

    for api in (torch.cuda.memory.CUDAPluggableAllocator, torch.cuda.MemPool, torch.cuda.use_mem_pool,
                torch.cuda.is_current_stream_capturing, torch.cuda.Event, torch.cuda.get_device_capability,
                torch.cuda.get_device_name, torch.cuda.get_device_properties, torch.cuda.synchronize,
                torch.cuda.current_stream, cpp_extension.load, cpp_extension.verify_ninja_availability):
        assert callable(api)
    assert hasattr(cpp_extension, "CUDA_HOME")
    rt = _cuda.CudaRuntime()
    assert rt.is_cuda(torch.device("cuda", 0)) and not rt.is_cuda(DEV) and rt.torch_cuda() == torch.version.cuda


def test_the_note_lists_existing_tests():
    """docs/CUDA_SEAM.md names a CPU test for each CUDA-only branch: every test id it names exists."""
    text = NOTE.read_text()
    ids = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)", text))
    assert len(ids) > 20
    for path, name in ids:
        src = (ROOT / path).read_text()
        assert re.search(rf"^def {name}\(", src, re.M), f"{path}::{name} named in {NOTE.name} does not exist"


# ------------------------------------------------------------------------------------------ backend selection
def test_auto_builds_the_extension_once_and_uses_it(fake_cuda):
    assert _backend.select("op", DEV) == "cuda"
    assert _backend.select("op", DEV) == "cuda"
    assert fake_cuda.count("build_extension") == 1
    assert _backend.select("op", DEV, cuda=False) == "triton"  # a Triton-only op


def test_build_failure_falls_back_to_triton_then_torch_warning_once_each(fake_cuda, monkeypatch, recwarn):
    pytest.importorskip("triton")
    fake_cuda.build_error = "nvcc fatal : Unsupported gpu architecture 'compute_90'"
    for _ in range(3):
        assert _backend.select("op", DEV) == "triton"
    msgs = [str(w.message) for w in recwarn.list]
    assert sum("CUDA extension unavailable (RuntimeError: nvcc fatal" in m for m in msgs) == 1
    assert fake_cuda.count("build_extension") == 1  # one attempt per process
    monkeypatch.setitem(sys.modules, "triton", None)  # not importable
    _backend.triton_status.cache_clear()
    A = torch.randn(1000)
    for _ in range(3):
        packed, absmax = torch.ops.qpeft.quantize_4bit(A, 64, "nf4")
    msgs = [str(w.message) for w in recwarn.list]
    assert sum("Triton unavailable (triton not importable" in m for m in msgs) == 1
    assert sum("CUDA extension unavailable" in m for m in msgs) == 1
    from qpeft.reference.quantize import quantize_4bit_ref

    want = quantize_4bit_ref(A, 64, "nf4")
    assert torch.equal(packed, want[0]) and torch.equal(absmax, want[1])
    assert "quantize_4bit_out" not in fake_cuda.names()


def test_explicit_backend_that_cannot_run_raises_with_the_reason(fake_cuda, monkeypatch):
    fake_cuda.build_error = "ninja: build stopped: subcommand failed."
    monkeypatch.setenv("QPEFT_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="QPEFT_BACKEND=cuda but the CUDA extension is unavailable: "
                                           "RuntimeError: ninja: build stopped"):
        torch.ops.qpeft.quantize_4bit(torch.randn(256), 64, "nf4")
    x = torch.randn(4, 8)
    w_down, w_up = torch.randn(2, 8), torch.randn(8, 2)
    with pytest.raises(RuntimeError, match="no CUDA C\\+\\+ implementation"):
        torch.ops.qpeft.bottleneck_adapter(x, w_down, None, w_up, None, "relu", 1.0)
    monkeypatch.setenv("QPEFT_BACKEND", "triton")
    monkeypatch.setitem(sys.modules, "triton", None)
    _backend.triton_status.cache_clear()
    with pytest.raises(RuntimeError, match="QPEFT_BACKEND=triton but Triton is unavailable: triton not importable"):
        torch.ops.qpeft.quantize_4bit(torch.randn(256), 64, "nf4")


def test_disabled_extension_is_never_built(fake_cuda, monkeypatch):
    monkeypatch.setenv("QPEFT_DISABLE_CUDA_EXT", "1")
    with pytest.warns(RuntimeWarning, match="disabled by QPEFT_DISABLE_CUDA_EXT=1"):
        _backend.select("op", DEV, triton=False)
    assert fake_cuda.count("build_extension") == 0


def test_backend_info_on_a_cuda_machine(fake_cuda):
    info = _backend.backend_info()
    assert info["cuda_device"] == "NVIDIA H100 80GB HBM3" and info["torch_cuda"] == "13.0"
    assert info["cuda_ext"] == (True, "built")
    fake_cuda.pretend(build_error="nvcc fatal : Unsupported gpu architecture 'compute_90'")
    fake_cuda.built = False
    assert _backend.backend_info()["cuda_ext"] == (False, "RuntimeError: nvcc fatal : Unsupported gpu "
                                                          "architecture 'compute_90'")
    fake_cuda.pretend(present=False)
    info = _backend.backend_info()
    assert info["cuda_device"] is None and info["cuda_ext"][0] is False and "no CUDA device" in info["cuda_ext"][1]
    assert _backend.select("op", DEV) == "torch"  # no device: CPU tensors are CPU tensors


def test_hopper_gate_follows_the_device(fake_cuda):
    assert _backend.is_hopper_or_newer(DEV) and _backend.is_hopper_or_newer(torch.device("cpu", 0))
    fake_cuda.pretend(**A100)
    assert not _backend.is_hopper_or_newer(DEV)
    assert not _backend.is_hopper_or_newer(torch.device("meta"))


# ------------------------------------------------------------------------------------------ the JIT build
def test_target_arch_and_build_dir_follow_the_visible_gpu(fake_cuda, monkeypatch, tmp_path):
    assert _jit.target_arch() == "9.0"
    tag = f"torch{torch.__version__.split('+')[0]}-cu13.0-sm90"
    assert _jit.build_dir() == tmp_path / "build" / tag
    fake_cuda.pretend(capability=(8, 6))
    assert _jit.target_arch() == "8.6" and _jit.build_dir().name.endswith("-sm86")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # an explicit list wins over the device
    assert _jit.target_arch() == "8.0;9.0" and _jit.build_dir().name.endswith("-sm80_90")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    fake_cuda.pretend(present=False)
    with pytest.raises(RuntimeError, match="set TORCH_CUDA_ARCH_LIST"):
        _jit.target_arch()


def test_load_builds_once_per_arch_into_its_own_cache_dir(fake_cuda, monkeypatch, tmp_path):
    out = _jit.load()
    assert _jit.load() is out and len(fake_cuda.builds) == 1  # cached for the process
    b = fake_cuda.builds[0]
    assert b["name"] == "qpeft_C" and b["build_directory"] == str(out) and out == _jit.build_dir()
    assert b["sources"] == [str(p) for p in _jit.sources()] and any(s.endswith("paged_alloc.cu") for s in b["sources"])
    assert b["cuda_home"] == str(tmp_path / "cuda") and b["is_python_module"] is False
    assert "-std=c++20" in b["extra_cflags"] and "-std=c++20" in b["extra_cuda_cflags"]
    import os

    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"  # what cpp_extension compiles for
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    fake_cuda.pretend(**A100)  # another GPU (and the memoised load is dropped)
    out80 = _jit.load()
    assert out80 != out and out80.name.endswith("-sm80") and len(fake_cuda.builds) == 2
    assert (out / "qpeft_C.so").exists() and (out80 / "qpeft_C.so").exists()


def test_load_removes_the_baton_of_an_interrupted_build(fake_cuda, recwarn, monkeypatch):
    """Where torch's build guard is a plain `lock` file that only its owner removes (torch.utils.file_baton), a
    build killed mid-way left one, and the next build waited on it forever. qpeft builds under an flock (released
    by the kernel when a process dies), so a baton it finds is stale: removed, with a warning, and the build runs."""
    import fcntl

    monkeypatch.setattr(_jit, "_torch_guard_is_a_baton", lambda: True)
    out = _jit.build_dir()
    out.mkdir(parents=True)
    (out / "lock").write_bytes(b"")  # what torch.utils.file_baton leaves when its build is killed
    assert _jit.load() == out and len(fake_cuda.builds) == 1
    assert not (out / "lock").exists()
    assert any("left by a build that was interrupted" in str(w.message) for w in recwarn.list)
    with open(out / "qpeft-build.flock") as f:  # released after the build
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_load_leaves_an_os_lock_file_alone(fake_cuda, recwarn, monkeypatch):
    """Where torch holds an OS lock on <build dir>/lock (filelock: the file stays after every build, harmlessly),
    qpeft neither removes it nor warns; without any file, no warning either."""
    monkeypatch.setattr(_jit, "_torch_guard_is_a_baton", lambda: False)
    out = _jit.build_dir()
    out.mkdir(parents=True)
    (out / "lock").write_bytes(b"")
    assert _jit.load() == out and (out / "lock").exists()
    monkeypatch.setattr(_jit, "_torch_guard_is_a_baton", lambda: True)
    (out / "lock").unlink()
    _cuda.clear_caches()
    assert _jit.load() == out and len(fake_cuda.builds) == 2
    assert not any("interrupted" in str(w.message) for w in recwarn.list)


def test_torch_build_guard_detection_matches_this_torch():
    """`_torch_guard_is_a_baton` reads what cpp_extension imports; check it against the guard its JIT build really
    takes on <build dir>/lock (FileBaton before filelock: torch 2.11 in the image lane, FileLock in 2.15)."""
    import inspect

    from torch.utils import cpp_extension

    src = inspect.getsource(cpp_extension._jit_compile)
    uses_baton, uses_os_lock = "FileBaton(" in src, "FileLock(" in src
    assert uses_baton != uses_os_lock, "torch's JIT build guard changed: revisit qpeft._jit._build_lock"
    assert _jit._torch_guard_is_a_baton() == uses_baton


def test_load_raises_the_reason_before_compiling(fake_cuda, monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CUDA_HOME", str(empty))
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(RuntimeError, match="nvcc not found"):
        _jit.load()
    assert _backend.cuda_ext_status() == (False, "RuntimeError: qpeft: nvcc not found (set CUDA_HOME or put nvcc "
                                                 "on PATH)")
    fake_cuda.pretend(cuda_version=None)
    with pytest.raises(RuntimeError, match="no CUDA support"):
        _jit.load()
    assert fake_cuda.builds == []


def test_a_failed_build_is_retried_by_load_but_asked_once_by_the_backend(fake_cuda):
    fake_cuda.build_error = "error: identifier \"__hmul2\" is undefined"
    for _ in range(2):
        with pytest.raises(RuntimeError, match="__hmul2"):
            _jit.load()
    assert len(fake_cuda.builds) == 2  # load() caches only a success: a fixed toolchain builds on the next call
    for _ in range(3):
        assert _backend.cuda_ext_status()[0] is False
    assert len(fake_cuda.builds) == 3


# ------------------------------------------------------------------------------------------ dispatch plans
@pytest.mark.parametrize("gpu", ["H100", "A100"])
def test_default_nf4_plan_per_gpu(fake_cuda, gpu):
    if gpu == "A100":
        fake_cuda.pretend(**A100)
    hopper = gpu == "H100"
    # fwd: the CUDA decode kernels up to M = 16; above, Triton on Hopper (serial split-K up to M = 256), CUDA C++
    # before it (the tensor-core decode kernel up to M = 64 for 16-bit x and K % 256 == 0, then the tile GEMM)
    for M, want_fwd in ((1, "cuda"), (16, "cuda"), (17, "triton" if hopper else "cuda"),
                        (64, "triton" if hopper else "cuda"), (512, "triton" if hopper else "cuda")):
        p = dispatch.plan("fwd", M, 4096, 4096, torch.bfloat16, DEV)
        assert (p.backend, p.source) == (want_fwd, "default"), M
        assert dispatch.plan("dx", M, 4096, 4096, torch.bfloat16, DEV).backend == ("triton" if hopper else "cuda")
    assert dispatch.plan("fwd", 17, 4096, 4000, torch.bfloat16, DEV).backend == ("triton" if hopper else "cuda")


def test_tuned_nf4_plan_found_by_device_name_then_capability(fake_cuda, monkeypatch):
    from qpeft.ops import nf4_matmul_tuned

    rows = [dict(dir="fwd", K=4096, N=4096, M=M, candidate=c, backend=b, config=cfg, ms=ms)
            for M in (1, 64) for c, b, cfg, ms in (("cuda", "cuda", None, 1.0 if M == 1 else 3.0),
                                                  ("t64", "triton", {"BLOCK_M": 64}, 2.0))]
    monkeypatch.setattr(nf4_matmul_tuned, "TABLES", {"NVIDIA H100 80GB HBM3": dispatch.build_table(rows, (9, 0), "t")})
    dispatch._plan_cached.cache_clear()
    p = dispatch.plan("fwd", 64, 4096, 4096, torch.float16, DEV)
    assert p.backend == "triton" and p.config() == {"BLOCK_M": 64} and p.source.startswith("tuned:NVIDIA H100")
    assert dispatch.plan("fwd", 1, 4096, 4096, torch.float16, DEV).backend == "cuda"
    assert dispatch.plan("fwd", 64, 4096, 4096, torch.float32, DEV).source == "default"  # fp32: not tuned
    fake_cuda.pretend(name="NVIDIA H200")  # same sm_90: the H100's table
    assert dispatch.plan("fwd", 64, 4096, 4096, torch.float16, DEV).source.startswith("tuned:NVIDIA H100")
    fake_cuda.pretend(**A100)
    assert dispatch.plan("fwd", 64, 4096, 4096, torch.float16, DEV).source == "default"


def test_triton_tiles_follow_the_gpus_sm_count(fake_cuda):
    pytest.importorskip("triton")
    from qpeft.triton_kernels import nf4_matmul as tk

    # M = 128, N = 4096: 132 SMs need >= 132 programs -> 32 x 64 tiles (256); 20 SMs are filled by 128 x 128 (32)
    def tile():
        cfg = tk._fwd_config(128, 4096, 4096, DEV)
        return cfg["BLOCK_M"], cfg["BLOCK_N"]

    assert tk._num_sms(DEV) == 132 and tile() == (32, 64)
    fake_cuda.pretend(sm_count=20)
    assert tk._num_sms(DEV) == 20 and tile() == (128, 128)


def test_triton_register_code_book_is_taken_on_sm80_and_newer_only(fake_cuda):
    """The register code-book loader of the Triton NF4 GEMM is inline PTX with cvt.rn.bf16x2/f16x2 (sm_80+): on a
    7.x GPU, for fp32 activations, K % blocksize != 0 or a packed weight not 4-byte aligned the launchers keep the
    gather loader, and its larger tiles are chosen only with it."""
    pytest.importorskip("triton")
    from qpeft.triton_kernels import nf4_matmul as tk

    if tk._INTERPRET:
        pytest.skip("the interpreter never takes the register code book (inline PTX)")
    packed, code = torch.zeros(4096 * 2048 + 4, dtype=torch.uint8), torch.zeros(16)
    fits = lambda dtype=torch.bfloat16, K=4096, w=packed: tk._register_book_fits(K, 64, dtype, w, code)  # noqa: E731
    assert fits() and fits(torch.float16)
    assert not fits(torch.float32) and not fits(K=4000) and not fits(w=packed[1:])
    assert tk._fwd_config(1024, 4096, 4096, DEV, register_book=True)["BLOCK_K"] == 64
    assert tk._fwd_config(1024, 4096, 4096, DEV)["BLOCK_K"] == 32
    # a double-quantized weight's absmax is read from the register table and as words only with the register book
    from utils import recorded_triton_launches

    N, K = 256, 512
    w, a = torch.zeros(N * K // 2, dtype=torch.uint8), torch.randint(0, 256, (N * K // 64,), dtype=torch.uint8)
    nested = (torch.rand(N * K // 64 // 256), torch.randn(256), torch.tensor(0.25))

    def nested_reads():
        with recorded_triton_launches() as launches:
            tk.nf4_matmul_triton(torch.randn(512, K, dtype=torch.bfloat16), w, a, code, 64, N, *nested)
            tk.nf4_matmul_dx_triton(torch.randn(512, N, dtype=torch.bfloat16), w, a, code, 64, K, *nested)
        return [(one.kwargs["REG_BOOK"], one.kwargs["NESTED_TABLE"], one.kwargs["ABSMAX_WORDS"]) for one in launches]

    assert nested_reads() == [(True, True, True)] * 2
    fake_cuda.pretend(capability=(7, 5))
    assert not fits() and not fits(torch.float16)
    assert nested_reads() == [(False, False, False)] * 2


def test_grouped_nf4_takes_the_register_code_book_on_sm80_and_newer_only(fake_cuda):
    """The grouped experts' GEMM (MoE) takes nf4_matmul's register code book, and its 64-wide K steps at training
    sizes, on the same condition: on a 7.x GPU it keeps the gather loader and its 32-wide K steps, and with it the
    double-quantized absmax's gathers (no NESTED_TABLE, no ABSMAX_WORDS: both belong to the register code book)."""
    pytest.importorskip("triton")
    from qpeft.reference.grouped_nf4 import route_ref
    from qpeft.triton_kernels import grouped_nf4 as tk
    from utils import recorded_triton_launches

    if tk._INTERPRET:
        pytest.skip("the interpreter never takes the register code book (inline PTX)")
    # 4 experts (out 192, in 256), NF4 blocksize 64, as quantize_experts lays them out (nothing runs: recorded)
    packed, absmax, code = torch.zeros(4, 192 * 256 // 2, dtype=torch.uint8), torch.ones(4, 192 * 256 // 64), \
        torch.zeros(16)
    # ... double-quantized as bitsandbytes lays it out: absmax codes (uint8) with a 256-entry nested code book, an
    # fp32 absmax per 256 codes and an offset; rows of 256 = 4 blocks, so the codes are read as whole words
    n_absmax = torch.randint(0, 256, (4, 192 * 256 // 64), dtype=torch.uint8)
    n_nested_absmax, n_nested_code, n_offset = torch.rand(4 * 192 * 256 // 64 // 256), torch.randn(256), \
        torch.tensor(0.25)
    perm, token, seg = route_ref(torch.rand(512, 4).topk(2, dim=1).indices, 4)  # the op would ask the extension

    def launch(double_quant=False):
        scales = (n_absmax, n_nested_absmax, n_nested_code, n_offset) if double_quant else (absmax, None, None, None)
        with recorded_triton_launches() as launches:
            tk.grouped_nf4_matmul_triton(torch.randn(512, 256, dtype=torch.bfloat16), token, packed, scales[0], code,
                                         64, 192, False, *scales[1:], seg, None, None, None, None, 0.0)
        (one,) = launches
        return tuple(one.kwargs[k] for k in ("REG_BOOK", "BLOCK_K", "NESTED_TABLE", "ABSMAX_WORDS"))

    assert launch() == (True, 64, False, False)
    assert launch(double_quant=True) == (True, 64, True, True)
    fake_cuda.pretend(capability=(7, 5))
    assert launch() == (False, 32, False, False)
    assert launch(double_quant=True) == (False, 32, False, False)


# ------------------------------------------------------------------------------------------ device choices
def test_transformers_default_device_map_is_the_current_gpu(fake_cuda):
    pytest.importorskip("transformers")
    from qpeft.integrations.transformers import QPeftHfQuantizer

    assert QPeftHfQuantizer.update_device_map(None, None) == {"": 0}
    assert QPeftHfQuantizer.update_device_map(None, {"": "cpu"}) == {"": "cpu"}
    fake_cuda.pretend(present=False)
    assert QPeftHfQuantizer.update_device_map(None, None) == {"": "cpu"}


def test_sharded_loader_defaults_to_the_current_gpu(fake_cuda, monkeypatch):
    """load_sharded_qlora's default device, and where its failure-agreement collectives put their small tensors:
    the current GPU (NCCL needs CUDA tensors), the CPU for gloo or without a GPU."""
    import torch.distributed as dist

    from qpeft.distributed.errors import collective_device
    from qpeft.distributed.loading import _device

    assert _device(None) == torch.device("cuda", 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert collective_device() == torch.device("cuda", 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collective_device() == torch.device("cpu")
    fake_cuda.pretend(present=False)
    assert _device(None) == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert collective_device() == torch.device("cpu")


def test_demo_resolves_auto_to_the_gpu(fake_cuda):
    from qpeft.demo.main import DemoSetupError, resolve_device

    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda", 0)
    fake_cuda.pretend(present=False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DemoSetupError, match="no CUDA device"):
        resolve_device("cuda")


def test_split_counters_are_cached_per_stream_and_fresh_under_capture(fake_cuda):
    """The serial split launches' counters (triton_kernels/_split_counters.py): on a CUDA device one zeroed buffer
    per (device, stream), reused (the kernels leave it zero) and grown when a launch needs more; another stream gets
    its own; under graph capture a fresh buffer every time, never the cached one."""
    pytest.importorskip("triton")
    from qpeft.triton_kernels import _split_counters as sc

    sc.clear()
    a = sc.split_counters(100, DEV)
    assert a.dtype == torch.int32 and a.shape == (100,) and not a.any()
    b = sc.split_counters(60, DEV)
    assert b.data_ptr() == a.data_ptr()  # the same buffer, no memset kernel
    big = sc.split_counters(5000, DEV)
    assert big.shape == (5000,) and not big.any() and big.data_ptr() != a.data_ptr()
    assert sc.split_counters(10, DEV).data_ptr() == big.data_ptr()
    fake_cuda.stream = 7
    other = sc.split_counters(10, DEV)
    assert other.data_ptr() != big.data_ptr() and sc.split_counters(10, DEV).data_ptr() == other.data_ptr()
    with fake_cuda.capture():
        c1, c2 = sc.split_counters(10, DEV), sc.split_counters(10, DEV)
    assert len({c1.data_ptr(), c2.data_ptr(), other.data_ptr()}) == 3 and not c1.any()
    sc.clear()
    with fake_cuda.off():  # not a CUDA device: fresh zeros, nothing cached
        assert not sc.split_counters(10, DEV).any() and not sc._BUFFERS
