"""Per-rank memory of a QLoRA model sharded with FSDP2 across 1 / 2 / 4 CPU ranks (gloo), and a projection for
Llama-3-70B QLoRA on 2 and 8 GPUs from the measured bytes per quantized parameter.

    python -m benchmarks.bench_shard [--size-gb 1.0] [--ranks 1 2 4]

Each rank builds the synthetic bf16 Llama checkpoint of bench_load.py (~1 GB) with
qpeft.distributed.load_sharded_qlora (QPeftConfig: NF4 + double quant; LoRA r=16 on all linear layers): the
model is built on meta and sharded, then rank 0 reads and quantizes one decoder layer at a time and broadcasts it,
so no rank holds the whole model. Then one AdamW step (batch 1, 64 tokens). Measured per rank: RssAnon
(anonymous memory, /proc/<pid>/status; the checkpoint's mapped pages are page cache) after the imports (start),
its peak during loading and after it (sampled every 5 ms inside the rank), after the step, the peak over the whole
run (sampled by the parent); and the bytes of the rank's local parameters and of its 4-bit shards. Needs torch
>= 2.12. Results: benchmarks/results/<device>/shard.csv.

Measured (2-core CPU, torch 2.15, gloo, 9-layer 1 GB bf16 checkpoint; MiB; start 436 on every rank):

    world  rank  load peak  after load  after step  run peak  local params  local 4-bit
      1     0      1179        908        1225       1607        469.6         199.5
      2     0      1004        673        1354       1826        234.8          99.8
      2     1       923        673        1365       1842        234.8          99.8
      4     0       827        556        1172       1577        117.4          49.9
      4    1-3    802-804      555-556   1157-1176  1611-1662     117.4          49.9

The local parameters are exactly 1/world_size (0.5156 bytes per 4-bit weight with double quant), and loading
scales: what a rank keeps after loading is start + its shards + ~3 MiB (908 -> 673 -> 556 MiB on every rank),
the load peak falls 1179 -> 1004 -> 827 MiB (rank 0, which also holds a unit's dense weights while quantizing;
the others 923 / 802 MiB). The peak above "after load" is one unit in flight: the largest unit is the rest of the
model (embeddings + head, 250 MiB in bf16), not a decoder layer (~26 MiB quantized). Before the sharded loader
(every rank read the whole 4-bit model) it was ~1.0 GB after sharding and ~1.9 GB peak on every rank at every
world size. The training step does not scale on this model: the root FSDP group (embeddings + head) is gathered
whole for forward and backward, activations and fp32 LoRA state are the same on every rank, and glibc keeps the
freed heap, so the run peak stays 1.6-1.8 GiB; on a 70B model the decoder layers, which do scale, dominate.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import env_info, print_table, write_csv  # noqa: E402
from benchmarks.common import rss_anon as _rss_anon  # noqa: E402

MIB, GIB = 2 ** 20, 2 ** 30

_RANK = r"""
import gc, json, os, sys, threading, time, torch, torch.distributed as dist
def anon():
    for line in open(f"/proc/{os.getpid()}/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
peak = [0]
def sample():  # this rank's own peak RssAnon, read at the end of each phase (the parent samples the whole run)
    while True:
        peak[0] = max(peak[0], anon()); time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
import qpeft
from qpeft.distributed import load_sharded_qlora
import qpeft.integrations.transformers, transformers.models.llama.modeling_llama  # imports before the baseline
torch.set_num_threads(1)
dist.init_process_group("gloo")
out = {"rank": dist.get_rank(), "start": anon()}
model = load_sharded_qlora(sys.argv[1], qpeft.QPeftConfig(), lora=dict(target_modules="all-linear", r=16,
                           lora_alpha=32), torch_dtype=torch.bfloat16, device="cpu")
gc.collect(); out["loaded"] = anon(); out["load_peak"] = max(peak[0], out["loaded"])
quant = [p for m in model.modules() if isinstance(m, qpeft.QLinearNF4) for p in m.quantized_parameters()]
out["quantized_numel"] = sum(m.quantized_numel() for m in model.modules() if isinstance(m, qpeft.QLinearNF4))
out["quantized_bytes_full"] = sum(p.numel() for p in quant)
out["quantized_bytes_local"] = sum(p.to_local().untyped_storage().nbytes() for p in quant)
out["local_bytes_all"] = sum(p.to_local().untyped_storage().nbytes() for p in model.parameters())
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(3, 32000, (1, 64), generator=torch.Generator().manual_seed(0))
model.train(); loss = model(input_ids=ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad()
gc.collect(); out["stepped"] = anon(); out["loss"] = loss.item()
print("RESULT " + json.dumps(out), flush=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(path: Path, ws: int) -> list[dict]:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(ws), LOCAL_RANK=str(r),
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                                  OMP_NUM_THREADS="1"))
             for r in range(ws)]
    peaks = [0] * ws
    done = threading.Event()

    def sample():
        while not done.is_set():
            for i, p in enumerate(procs):
                try:
                    peaks[i] = max(peaks[i], _rss_anon(p.pid))
                except (FileNotFoundError, ProcessLookupError):
                    pass
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    rows = []
    for i, p in enumerate(procs):
        stdout, stderr = p.communicate(timeout=1800)
        line = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            raise RuntimeError(f"rank {i} of {ws} failed:\n{stderr[-2000:]}")
        r = json.loads(line[0][len("RESULT "):])
        rows.append(r)
    done.set()
    t.join()
    out = []
    for r, peak in zip(rows, peaks):
        out.append({"world_size": ws, "rank": r["rank"], "start_mib": r["start"] / MIB,
                    "load_peak_mib": r["load_peak"] / MIB, "loaded_mib": r["loaded"] / MIB,
                    "after_step_mib": r["stepped"] / MIB, "local_params_mib": r["local_bytes_all"] / MIB,
                    "peak_mib": peak / MIB, "quantized_local_mib": r["quantized_bytes_local"] / MIB,
                    "quantized_full_mib": r["quantized_bytes_full"] / MIB,
                    "bytes_per_quantized_param": r["quantized_bytes_full"] / r["quantized_numel"],
                    "loss": r["loss"]})
    return out


# Llama-3-70B: hidden 8192, intermediate 28672, 80 layers, 64 heads / 8 KV heads (head dim 128), vocab 128256
L70 = dict(hidden=8192, inter=28672, layers=80, kv=1024, vocab=128256)


def project_70b(bytes_per_param: float, gpus: int, r: int = 16) -> dict:
    """Static per-GPU bytes of Llama-3-70B QLoRA sharded over `gpus`: the 4-bit linear weights at the measured
    bytes per parameter, bf16 embeddings + head, LoRA r in fp32 with its gradient and two AdamW states (16 B
    per parameter), all divided by the GPU count, plus two decoder layers gathered at a time (the one running
    and FSDP2's prefetch of the next). Activations, the CUDA context and allocator slack are not included."""
    h, i, n, kv, v = L70["hidden"], L70["inter"], L70["layers"], L70["kv"], L70["vocab"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    lora_per_layer = r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))
    quant = n * per_layer * bytes_per_param
    dense = 2 * v * h * 2
    lora = n * lora_per_layer * 16
    gathered = 2 * (per_layer * bytes_per_param + lora_per_layer * 4)
    return {"gpus": gpus, "quantized_gib": quant / GIB, "per_gpu_static_gib": ((quant + dense + lora) / gpus
                                                                               + gathered) / GIB}


ANCHORS = [  # published per-GPU figures (scaleout.md §1.3, §1.4): measured with activations
    {"anchor": "Answer.AI fsdp_qlora, Llama-2-70B, 2x24 GB, ctx 2048, batch 2, CPU offload", "per_gpu_gib": 14.92},
    {"anchor": "PEFT docs, ZeRO-3 + QLoRA, Llama-70B, 2x40 GB", "per_gpu_gib": 36.6e9 / GIB},
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="bf16 checkpoint size (default 1.0)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args(argv)
    from benchmarks.bench_load import make_checkpoint

    root = Path(os.environ.get("QPEFT_BENCH_DIR", tempfile.gettempdir())) / f"qpeft-bench-load-{args.size_gb:g}gb"
    root.mkdir(parents=True, exist_ok=True)
    make_checkpoint(root, args.size_gb)
    rows = []
    for ws in args.ranks:
        rows += run_world(root, ws)
    bpp = rows[0]["bytes_per_quantized_param"]
    proj = [project_70b(bpp, g) for g in (2, 8)]
    print(env_info())
    print_table(rows, ["world_size", "rank", "start_mib", "load_peak_mib", "loaded_mib", "after_step_mib", "peak_mib",
                       "local_params_mib", "quantized_local_mib", "quantized_full_mib", "bytes_per_quantized_param"])
    print_table(proj)
    print_table(ANCHORS)
    rows += [{"projection": "Llama-3-70B QLoRA r=16, static (no activations)", "bytes_per_quantized_param": bpp, **p}
             for p in proj]
    rows += ANCHORS
    print("wrote", write_csv("shard", rows))


if __name__ == "__main__":
    main()
