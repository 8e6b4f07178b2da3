"""qpeft.linear_cross_entropy vs eager F.linear + F.cross_entropy, Liger's fused linear CE and Apple's Cut
Cross-Entropy (each when installed): time of forward + backward and the loss path's peak memory.

    python -m benchmarks.bench_linear_cross_entropy [--quick] [--heads llama3,...] [--tokens 4096,...]
                                                   [--chunk-mb 256,...]       # GPU sweep (CPU: small shapes)
    python -m benchmarks.bench_linear_cross_entropy --cpu-memory [--tokens 4096 --vocab 128256 --hidden 2048]

GPU sweep (bf16): heads llama2 (V = 32,000, H = 4,096), llama3 (128,256 x 4,096), gemma2 (256,000 x 2,304, Gemma 2
2B: the shape of CCE's table), 4k-32k tokens, 10% of the labels ignored. Head kinds: "frozen" (QLoRA: only the
hidden states need a gradient), "trainable" (the head gets dW too) and "nf4" (a frozen NF4 head, double quant;
only qpeft takes one). Providers, one process, the same inputs:
  eager        transformers' loss path: logits = F.linear(x, W) in bf16, upcast to fp32, F.cross_entropy (for
               the nf4 kind on the dequantized bf16 copy of the head)
  compile      torch.compile of eager
  qpeft        linear_cross_entropy, default strategy ("forward" for a frozen head: the gradient is produced in the
               forward from logits computed once per token chunk; "recompute" for a trainable head)
  qpeft_fwd / qpeft_recompute   the two gradient strategies forced: the pair that settles the default rule in
               qpeft/autograd/linear_cross_entropy.py (4 vs 6 N·V·H FLOPs for a frozen head, measured here)
  liger        LigerFusedLinearCrossEntropyLoss (if liger_kernel imports)
  cce / cce_exact   cut_cross_entropy.linear_cross_entropy, impl "cce" (gradient filtering) and "cce_exact"
Columns: median ms of forward + backward (p20 / p80), peak MiB above the inputs (torch.cuda.max_memory_allocated,
gradients included), |loss - eager loss| as a sanity check. --chunk-mb sweeps qpeft's stored-chunk budget
(triton_kernels/linear_cross_entropy.CHUNK_BYTES). Results: benchmarks/results/<device>/linear_cross_entropy.csv.

--cpu-memory: each of eager and qpeft (frozen and trainable fp32 heads) runs forward + backward once in a fresh
process; the parent samples the child's RssAnon (/proc/<pid>/status) every millisecond from the moment the inputs
exist (after a warm-up call on tiny shapes, so lazy imports are not counted). The bound of issue 23: qpeft's peak
above its inputs is at most 5% of eager's. Results: benchmarks/results/<cpu device>/linear_cross_entropy_memory.csv.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import bench, env_info, on_gpu, print_table, write_csv  # noqa: E402
from benchmarks.common import rss_anon as _rss_anon  # noqa: E402

MIB = 2 ** 20
HEADS = {"llama2": (32000, 4096), "llama3": (128256, 4096), "gemma2": (256000, 2304)}
TOKENS = (4096, 8192, 16384, 32768)
COLUMNS = ["head", "V", "H", "tokens", "kind", "provider", "chunk_mb", "ms", "p20", "p80", "peak_mib",
           "loss_delta", "error"]


# ------------------------------------------------------------------------------------------------ providers
def _eager(x, w, t, b=None):
    return F.cross_entropy(F.linear(x, w, b).float(), t, ignore_index=-100)


def _qpeft(strategy: str):
    from qpeft.autograd.linear_cross_entropy import linear_cross_entropy_impl

    return lambda x, w, t, b=None: linear_cross_entropy_impl(x, w, t, b, grad_strategy=strategy)


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # noqa: BLE001  not installed / broken on this torch
        return None, f"liger_kernel unavailable: {type(e).__name__}: {e}"[:200]
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    return (lambda x, w, t, b=None: loss(w, x, t, b)), None


def _cce(impl: str):
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except Exception as e:  # noqa: BLE001
        return None, f"cut_cross_entropy unavailable: {type(e).__name__}: {e}"[:200]
    return (lambda x, w, t, b=None: cce(x, w, t, bias=b, ignore_index=-100, impl=impl)), None


def providers(kind: str) -> dict:
    """name -> (fn(x, w, t) or None, reason it is missing)."""
    out = {"eager": (_eager, None)}
    if on_gpu():  # Inductor on the CPU would only measure its compile time here
        out["compile"] = (torch.compile(_eager), None)
    out["qpeft"] = (_qpeft("auto"), None)
    if kind in ("frozen", "nf4"):
        out["qpeft_fwd"] = (_qpeft("forward"), None)
        out["qpeft_recompute"] = (_qpeft("recompute"), None)
    if kind == "nf4":  # nobody else takes a 4-bit head; eager runs on its dequantized copy (the loss check)
        return {k: v for k, v in out.items() if k.startswith("qpeft") or k == "eager"}
    out["liger"] = _liger()
    out["cce"] = _cce("cce")
    out["cce_exact"] = _cce("cce_exact")
    return out


# ------------------------------------------------------------------------------------------------ GPU / CPU timing
def _inputs(N: int, V: int, H: int, kind: str, dtype, dev):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(N, H, generator=g)).to(dev, dtype).requires_grad_(True)
    w = (torch.randn(V, H, generator=g) * H ** -0.5).to(dev, dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[::10] = -100
    t = t.to(dev)
    head = w
    if kind == "trainable":
        w.requires_grad_(True)
    elif kind == "nf4":
        import qpeft

        head = qpeft.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
        w = qpeft.dequantize_4bit(*head, dtype)  # the eager reference of the same weight (not timed)
    return x, w, head, t


def _measure(fn, x, head, t, dev) -> dict:
    params = [p for p in (x, head if isinstance(head, torch.Tensor) else None) if p is not None and p.requires_grad]

    def step():
        loss = fn(x, head, t)
        loss.backward()
        for p in params:
            p.grad = None
        return loss

    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / MIB
    else:
        loss, peak = step(), float("nan")
    timing = bench(step)
    return {"ms": timing["ms"], "p20": timing["p20"], "p80": timing["p80"], "peak_mib": peak,
            "loss": float(loss.detach())}


def run(quick: bool = False, heads: list[str] | None = None, tokens: list[int] | None = None,
        chunk_mb: list[int] | None = None, kinds: list[str] | None = None) -> list[dict]:
    import qpeft.triton_kernels.linear_cross_entropy as tk

    gpu = on_gpu()
    dev = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    if gpu:
        shapes = [(h, *HEADS[h]) for h in (heads or list(HEADS))]
        token_list = tokens or (list(TOKENS[:2]) if quick else list(TOKENS))
    else:  # CPU: small shapes, so the suite always runs (the reference path; times are not the GPU's)
        shapes, token_list = [("small", 8192, 256)], tokens or [512]
    kinds = kinds or ["frozen", "trainable", "nf4"]
    chunks = chunk_mb or [tk.CHUNK_BYTES // MIB]
    default_chunk = tk.CHUNK_BYTES
    rows = []
    try:
        for name, V, H in shapes:
            for N in token_list:
                for kind in kinds:
                    x, w, head, t = _inputs(N, V, H, kind, dtype, dev)
                    ref_loss = None
                    for prov, (fn, why) in providers(kind).items():
                        for mb in (chunks if prov.startswith("qpeft") else [None]):
                            row = {"head": name, "V": V, "H": H, "tokens": N, "kind": kind, "provider": prov,
                                   "chunk_mb": mb}
                            if fn is None:
                                rows.append({**row, "error": why})
                                continue
                            if mb is not None:
                                tk.CHUNK_BYTES = mb * MIB
                            arg = head if prov.startswith("qpeft") else w
                            try:
                                r = _measure(fn, x, arg, t, dev)
                            except torch.OutOfMemoryError:
                                rows.append({**row, "error": "out of memory"})
                                continue
                            except Exception as e:  # noqa: BLE001  one provider failing must not stop the sweep
                                rows.append({**row, "error": f"{type(e).__name__}: {e}"[:200]})
                                continue
                            finally:
                                tk.CHUNK_BYTES = default_chunk
                                if gpu:
                                    torch.cuda.empty_cache()
                            if prov == "eager":
                                ref_loss = r["loss"]
                            delta = abs(r.pop("loss") - ref_loss) if ref_loss is not None else float("nan")
                            rows.append({**row, **r, "loss_delta": delta})
                    del x, w, head, t
    finally:
        tk.CHUNK_BYTES = default_chunk
    return rows


# ------------------------------------------------------------------------------------------------ CPU memory
_CHILD = r"""
import json, sys, time, torch, torch.nn.functional as F
from qpeft.autograd.linear_cross_entropy import linear_cross_entropy
mode, kind, N, V, H = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
torch.manual_seed(0)
loss_fn = (lambda x, w, t: F.cross_entropy(F.linear(x, w), t)) if mode == "eager" else linear_cross_entropy
xs, ws = torch.randn(8, 16, requires_grad=True), torch.randn(32, 16, requires_grad=kind == "trainable")
loss_fn(xs, ws, torch.randint(0, 32, (8,))).backward()  # warm-up: lazy imports and first-call setup
x = torch.randn(N, H, requires_grad=True)
w = torch.randn(V, H) * H ** -0.5
w.requires_grad_(kind == "trainable")
t = torch.randint(0, V, (N,))
print("READY", flush=True); sys.stdin.readline()
start = time.perf_counter()
loss = loss_fn(x, w, t)
loss.backward()
print("RESULT " + json.dumps({"loss": float(loss), "seconds": time.perf_counter() - start}), flush=True)
"""


def _measure_child(mode: str, kind: str, N: int, V: int, H: int) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, mode, kind, str(N), str(V), str(H)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        return {"mode": mode, "kind": kind, "error": (line + proc.stderr.read())[-300:].strip()}
    baseline = _rss_anon(proc.pid)
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], _rss_anon(proc.pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc.stdin.write("GO\n")
    proc.stdin.flush()
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            break
    done.set()
    sampler.join()
    err = proc.stderr.read() if result is None else ""
    proc.wait()
    if result is None:
        return {"mode": mode, "kind": kind, "error": err.strip().splitlines()[-1][:300] if err.strip() else "no result"}
    inputs = (N * H + V * H) * 4 + N * 8
    return {"mode": mode, "kind": kind, "tokens": N, "V": V, "H": H, "inputs_mib": inputs / MIB,
            "peak_above_inputs_mib": (peak[0] - baseline) / MIB, "seconds": round(result["seconds"], 1),
            "loss": result["loss"]}


def run_cpu_memory(N: int = 4096, V: int = 128256, H: int = 2048) -> list[dict]:
    rows = []
    for kind in ("frozen", "trainable"):
        eager = _measure_child("eager", kind, N, V, H)
        fused = _measure_child("qpeft", kind, N, V, H)
        if "error" not in eager and "error" not in fused:
            ratio = fused["peak_above_inputs_mib"] / eager["peak_above_inputs_mib"]
            fused.update(ratio_to_eager=ratio, within_5pct=ratio <= 0.05,
                         loss_delta=abs(fused["loss"] - eager["loss"]))
            # a trainable head's dW (V x H fp32) is an output both paths must hold: also the ratio without it
            if kind == "trainable":
                dw = V * H * 4 / MIB
                fused["ratio_without_dw"] = ((fused["peak_above_inputs_mib"] - dw)
                                             / (eager["peak_above_inputs_mib"] - dw))
        rows += [eager, fused]
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="GPU: 4k and 8k tokens only")
    ap.add_argument("--cpu-memory", action="store_true", help="the CPU peak-memory check (fresh processes)")
    ap.add_argument("--heads", default=None, help=f"comma-separated subset of {list(HEADS)}")
    ap.add_argument("--kinds", default=None, help="comma-separated subset of frozen,trainable,nf4")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts")
    ap.add_argument("--chunk-mb", default=None, help="comma-separated CHUNK_BYTES budgets (MiB) for qpeft")
    ap.add_argument("--vocab", type=int, default=128256, help="--cpu-memory: vocabulary size")
    ap.add_argument("--hidden", type=int, default=2048, help="--cpu-memory: hidden size")
    args = ap.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",")] if s else None  # noqa: E731
    if args.cpu_memory:
        tokens = ints(args.tokens) or [4096]
        rows = run_cpu_memory(tokens[0], args.vocab, args.hidden)
        suite = "linear_cross_entropy_memory"
        cols = ["mode", "kind", "tokens", "V", "H", "inputs_mib", "peak_above_inputs_mib", "ratio_to_eager",
                "within_5pct", "ratio_without_dw", "seconds", "loss", "loss_delta", "error"]
    else:
        if args.heads:
            unknown = set(args.heads.split(",")) - set(HEADS)
            if unknown:
                ap.error(f"--heads: unknown {sorted(unknown)}; expected a subset of {list(HEADS)}")
        rows = run(args.quick, args.heads.split(",") if args.heads else None, ints(args.tokens),
                   ints(args.chunk_mb), args.kinds.split(",") if args.kinds else None)
        suite, cols = "linear_cross_entropy", COLUMNS
    print(env_info())
    print_table(rows, cols)
    print("wrote", write_csv(suite, rows))
    failed = _all_failed(rows)
    if failed:  # tests/run_gpu.sh reads the exit status: a sweep where nothing of ours ran is not a result
        raise SystemExit(f"bench_linear_cross_entropy: {failed}")


def _all_failed(rows: list[dict]) -> str | None:
    """Why the run measured nothing worth keeping (every row an error, or every qpeft row), else None."""
    if not any("error" not in r for r in rows):
        return f"every one of the {len(rows)} rows failed" if rows else "no rows"
    ours = [r for r in rows if str(r.get("provider", "")).startswith("qpeft")]
    if ours and all("error" in r for r in ours):
        return f"every qpeft row failed (first: {ours[0]['error']})"
    return None


if __name__ == "__main__":
    main()
