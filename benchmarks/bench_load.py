"""Peak memory while loading a 4-bit model: quantize-on-load (QPeftConfig) vs bf16-then-quantize_model vs
transformers + bitsandbytes, on a synthetic sharded bf16 Llama checkpoint (~1 GB by default).

    python -m benchmarks.bench_load [--size-gb 1.0] [--quick]

Each load runs in its own process. On the CPU the measure is the peak of the child's anonymous memory
(RssAnon from /proc/<pid>/status, sampled every 2 ms): the checkpoint's memory-mapped file pages are the page
cache, not copies of the model, and would hide them in plain RSS. On a GPU it is torch.cuda.max_memory_allocated
(device_map={"": 0}). The bound of the issue: peak <= final model size + its largest tensor in full precision
+ 10%. Results: benchmarks/results/<device>/load.csv with the versions.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import atomic_write_text, env_info, print_table, write_csv  # noqa: E402
from benchmarks.common import rss_anon as _rss_anon  # noqa: E402

MIB = 2 ** 20
MODES = ("qpeft_on_load", "bf16_then_quantize_model", "bnb_on_load")


def _llama_config(size_gb: float) -> dict:
    """A Llama shape whose bf16 checkpoint is about size_gb (hidden 2048, GQA 4:1, 1 layer ~ 92 MB)."""
    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = (2 * hidden * hidden + 2 * hidden * hidden // 4 + 3 * hidden * inter) * 2
    embeddings = 2 * vocab * hidden * 2
    layers = max(1, round((size_gb * 2 ** 30 - embeddings) / per_layer))
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)


def make_checkpoint(path: Path, size_gb: float) -> dict:
    """Write (once per size) a random bf16 checkpoint in shards of 200 MB."""
    marker = path / "bench_load.json"
    if marker.exists():
        return json.loads(marker.read_text())
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = _llama_config(size_gb)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="200MB")
    info = {"config": cfg, "checkpoint_bytes": sum(p.numel() * 2 for p in model.parameters()),
            "largest_tensor_bytes": max(p.numel() * 2 for p in model.parameters())}
    atomic_write_text(marker, json.dumps(info))  # the marker says the checkpoint is complete
    return info


# The child: imports, reports READY, waits for GO (the parent takes the baseline in between), loads, reports.
_CHILD = r"""
import json, sys, torch
mode, path, device = sys.argv[1], sys.argv[2], sys.argv[3]
import qpeft, transformers
from transformers import AutoModelForCausalLM
from qpeft.models.quantization import model_bytes
device_map = {"": 0} if device == "cuda" else None
print("READY", flush=True); sys.stdin.readline()
if mode == "qpeft_on_load":
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qpeft.QPeftConfig(), dtype=torch.bfloat16,
                                                 device_map=device_map)
elif mode == "bf16_then_quantize_model":
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device_map)
    qpeft.quantize_model(model)
else:
    from transformers import BitsAndBytesConfig
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16,
                                                 device_map=device_map)
out = {"model_bytes": model_bytes(model)}
if device == "cuda":
    out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
print("RESULT " + json.dumps(out), flush=True)
"""


def measure(mode: str, path: Path, device: str) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, mode, str(path), device], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        return {"mode": mode, "error": (line + proc.stderr.read())[-300:].strip()}
    baseline = _rss_anon(proc.pid)
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], _rss_anon(proc.pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    proc.stdin.write("GO\n")
    proc.stdin.flush()
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            break
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    err = proc.stderr.read() if result is None else ""
    proc.wait()
    if result is None:
        return {"mode": mode, "error": err.strip().splitlines()[-1][:300] if err.strip() else "no result"}
    row = {"mode": mode, "seconds": round(seconds, 1), "model_mib": result["model_bytes"] / MIB,
           "peak_rss_anon_delta_mib": (peak[0] - baseline) / MIB}
    if "cuda_peak_bytes" in result:
        row["cuda_peak_mib"] = result["cuda_peak_bytes"] / MIB
    return row


def run(size_gb: float, quick: bool = False) -> list[dict]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = Path(os.environ.get("QPEFT_BENCH_DIR", tempfile.gettempdir())) / f"qpeft-bench-load-{size_gb:g}gb"
    root.mkdir(parents=True, exist_ok=True)
    info = make_checkpoint(root, size_gb)
    rows = []
    for mode in MODES[:2] if quick else MODES:
        row = measure(mode, root, device)
        row.update(checkpoint_mib=info["checkpoint_bytes"] / MIB, largest_tensor_mib=info["largest_tensor_bytes"] / MIB)
        if "model_mib" in row:
            bound = (row["model_mib"] + row["largest_tensor_mib"]) * 1.10
            peak = row.get("cuda_peak_mib", row["peak_rss_anon_delta_mib"])
            row.update(bound_mib=bound, within_bound=peak <= bound, peak_over_model=peak / row["model_mib"])
        rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="bf16 checkpoint size (default 1.0)")
    ap.add_argument("--quick", action="store_true", help="skip the bitsandbytes load")
    args = ap.parse_args(argv)
    rows = run(args.size_gb, args.quick)
    print(env_info())
    print_table(rows, ["mode", "seconds", "checkpoint_mib", "model_mib", "largest_tensor_mib",
                       "peak_rss_anon_delta_mib", "cuda_peak_mib", "bound_mib", "within_bound", "peak_over_model",
                       "error"])
    print("wrote", write_csv("load", rows))


if __name__ == "__main__":
    main()
