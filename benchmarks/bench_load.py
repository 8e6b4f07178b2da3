"""Peak memory while loading a 4-bit model: quantize-on-load (QPeftConfig) vs bf16-then-quantize_model vs
transformers + bitsandbytes, on a synthetic sharded bf16 checkpoint: a Llama (~1 GB by default) or a
Qwen3-30B-A3B-shaped mixture of experts of real width with few layers.

    python -m benchmarks.bench_load [--model llama|qwen3_moe] [--size-gb 1.0] [--quick]

Each load runs in its own process. On the CPU the measure is the peak of the child's anonymous memory
(RssAnon from /proc/<pid>/status, sampled every 2 ms): the checkpoint's memory-mapped file pages are the page
cache, not copies of the model, and would hide them in plain RSS. On a GPU it is torch.cuda.max_memory_allocated
(device_map={"": 0}). The bound of the issue: peak <= final model size + its largest tensor in full precision
+ 10%. Results: benchmarks/results/<device>/load.csv with the versions.

--model qwen3_moe: Qwen/Qwen3-30B-A3B's widths (hidden 2048, 128 experts of moe_intermediate_size 768, top 8,
32 query / 4 key-value heads of 128, vocab 151936, untied head) with as many decoder layers as --size-gb allows
(at least one; each layer's experts are 1.125 GiB in bf16, the embedding and the head 1.16 GiB together), all of
them MoE layers. save_pretrained writes the fused experts in the per-expert layout of the hub checkpoints
(`mlp.experts.<e>.{gate,up,down}_proj.weight`, transformers 5's conversion mapping reversed), in shards smaller
than one layer's experts, so the experts of one fused parameter span several shards. The bound's "largest tensor"
is the largest one the quantizer ever holds in full precision: the largest linear weight it quantizes (q_proj /
o_proj, 16 MiB) or ONE expert's merged slice (gate_up_proj[e], (2 x 768, 2048), 6 MiB), whichever is larger;
never a whole (128, d1, d2) experts stack (768 MiB for gate_up_proj). On load the model's merge converter for a
4-bit experts parameter is replaced by qpeft.integrations.transformers_moe.ExpertsStreamingConverter, which reads
expert e's per-expert tensors, merges that one expert, quantizes its (2I, H) slice with quantize_4bit into a
preallocated GroupedNF4Weight (qpeft.quant.experts.GroupedNF4Weight.set_expert) and drops it before reading expert
e+1. On the CPU, transformers leaves the tensors it loads unchanged (here the bf16 embedding and head, 1.16 GiB)
as views of the checkpoint's memory map: page cache, not RssAnon. The bound then uses the model's bytes less those
(`file_backed_mib`, found from /proc/self/maps), else it would be 1.16 GiB too lenient and a whole bf16 experts
stack held during the load would fit under it. bitsandbytes leaves the experts in bf16 (it converts
nn.Linear only), and that is the comparison. Each row also reports how many experts modules ended up 4-bit
(`nf4_experts`) and how many stayed dense (`dense_experts`) against the model's MoE layers (`moe_layers`), so that
a silent dense fallback cannot pass for a small peak. Results: benchmarks/results/<device>/load_moe.csv.
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
MODELS = ("llama", "qwen3_moe")
# Qwen/Qwen3-30B-A3B's config.json (the widths; num_hidden_layers is chosen from the size, weights are random)
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                     tie_word_embeddings=False, max_position_embeddings=4096)


def _llama_config(size_gb: float) -> dict:
    """A Llama shape whose bf16 checkpoint is about size_gb (hidden 2048, GQA 4:1, 1 layer ~ 92 MB)."""
    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = (2 * hidden * hidden + 2 * hidden * hidden // 4 + 3 * hidden * inter) * 2
    embeddings = 2 * vocab * hidden * 2
    layers = max(1, round((size_gb * 2 ** 30 - embeddings) / per_layer))
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)


def _qwen3_moe_config(size_gb: float, shape: dict | None = None) -> dict:
    """A Qwen3-MoE config of `shape`'s widths (default Qwen3-30B-A3B's) whose bf16 checkpoint is about size_gb:
    the embedding and the head, then as many decoder layers (at least one) as the rest holds."""
    cfg = dict(shape or QWEN3_30B_A3B)
    h, i, e, v = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = (3 * e * h * i + 2 * h * q + 2 * h * kv + e * h) * 2
    outside = 2 * v * h * 2
    cfg["num_hidden_layers"] = max(1, round((size_gb * 2 ** 30 - outside) / per_layer))
    return cfg


def _largest_quantized_bytes(model) -> int:
    """The largest tensor the qpeft quantizer holds in full precision: a linear weight it quantizes (not the
    head, which QPeftConfig keeps, nor the router, which is not an nn.Linear) or one expert's slice of a fused
    experts parameter (it streams them one expert at a time)."""
    import torch

    from qpeft.models.moe import find_experts

    out = 0
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear and not name.endswith("lm_head"):
            out = max(out, m.weight.numel() * m.weight.element_size())
    for t in find_experts(model):
        for p in t.param_names:
            w = getattr(t.module, p)
            out = max(out, w[0].numel() * w.element_size())
    return out


def make_checkpoint(path: Path, size_gb: float, model: str = "llama", shape: dict | None = None) -> dict:
    """Write (once per size) a random bf16 checkpoint: a Llama in shards of 200 MB, or a Qwen3-MoE (see
    `_qwen3_moe_config`) in shards of at most 40% of one layer's experts (500 MB at the real width)."""
    marker = path / "bench_load.json"
    if marker.exists():
        return json.loads(marker.read_text())
    if model == "qwen3_moe":
        return _make_moe_checkpoint(path, size_gb, shape, marker)
    if model != "llama":
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
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


def _make_moe_checkpoint(path: Path, size_gb: float, shape: dict | None, marker: Path) -> dict:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = _qwen3_moe_config(size_gb, shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: never a float32 copy of the model
    try:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**cfg))
    finally:
        torch.set_default_dtype(previous)
    layer_experts = sum(p.numel() * 2 for n, p in model.model.layers[0].named_parameters() if ".experts." in n)
    shard = max(1, int(0.4 * layer_experts))
    model.save_pretrained(path, max_shard_size=shard)  # the per-expert layout (the conversion mapping reversed)
    from safetensors import safe_open

    layer0 = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if k.startswith("model.layers.0.mlp.experts."):
                    layer0.setdefault(f.name, 0)
                    layer0[f.name] += 1
    info = {"model": "qwen3_moe", "config": cfg,
            "checkpoint_bytes": sum(p.numel() * 2 for p in model.parameters()),
            "largest_tensor_bytes": _largest_quantized_bytes(model),
            "experts_stack_bytes": max(p.numel() * 2 for n, p in model.named_parameters() if ".experts." in n),
            "moe_layers": len([m for m in model.modules() if type(m).__name__.endswith("Experts")]),
            "shard_bytes": shard, "shards": len(list(path.glob("*.safetensors"))),
            "layer0_experts_shards": len(layer0), "per_expert_keys": sum(layer0.values())}
    del model
    atomic_write_text(marker, json.dumps(info))  # the marker says the checkpoint is complete
    return info


# The child: imports, reports READY, waits for GO (the parent takes the baseline in between), loads, reports.
_CHILD = r"""
import json, sys, torch
mode, path, device = sys.argv[1], sys.argv[2], sys.argv[3]
moe = len(sys.argv) > 4 and sys.argv[4] == "qwen3_moe"
import qpeft, transformers
from transformers import AutoModelForCausalLM
from qpeft.models.quantization import model_bytes
device_map = {"": 0} if device == "cuda" else None
if moe:  # the modules a load imports lazily are imported before the baseline (tens of MB that are not the model)
    import qpeft.integrations.transformers, qpeft.integrations.transformers_moe
    from transformers import AutoConfig
    from transformers.models.qwen3_moe import modeling_qwen3_moe
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
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
if moe:
    from qpeft.models.moe import find_experts
    from qpeft.modules.nf4_experts import is_nf4_experts
    experts = find_experts(model)
    out["nf4_experts"] = sum(is_nf4_experts(t.module) for t in experts)
    out["dense_experts"] = sum(not is_nf4_experts(t.module) for t in experts)
    # tensors transformers left as views of the checkpoint's memory map (the bf16 embedding and head) are page
    # cache, not anonymous memory: the CPU bound compares RssAnon with the model's anonymous bytes only
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].endswith(".safetensors"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                maps.append((lo, hi))
    seen, mapped = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and t.device.type == "cpu":
            seen.add(id(t))
            if any(lo <= t.data_ptr() < hi for lo, hi in maps):
                mapped += t.numel() * t.element_size()
    out["file_backed_bytes"] = mapped
if device == "cuda":
    out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
print("RESULT " + json.dumps(out), flush=True)
"""


def measure(mode: str, path: Path, device: str, model: str = "llama") -> dict:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, mode, str(path), device, model], stdin=subprocess.PIPE,
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
    for key in ("nf4_experts", "dense_experts"):
        if key in result:
            row[key] = result[key]
    if "file_backed_bytes" in result:
        row["file_backed_mib"] = result["file_backed_bytes"] / MIB
    return row


def run(size_gb: float, quick: bool = False, model: str = "llama", modes=None, shape: dict | None = None,
        root: Path | None = None) -> list[dict]:
    """The rows of `modes` (default: all, --quick: without bitsandbytes). shape: the widths of the qwen3_moe
    config (default Qwen3-30B-A3B's; tests pass a tiny one); root: the checkpoint's directory."""
    import torch

    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if root is None:
        name = f"qpeft-bench-load-{size_gb:g}gb" if model == "llama" else f"qpeft-bench-load-{model}-{size_gb:g}gb"
        root = Path(os.environ.get("QPEFT_BENCH_DIR", tempfile.gettempdir())) / name
    modes = list(modes or (MODES[:2] if quick else MODES))
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"modes must hold entries of {MODES}, got {mode!r}")
    root.mkdir(parents=True, exist_ok=True)
    info = make_checkpoint(root, size_gb, model, shape)
    rows = []
    for mode in modes:
        row = measure(mode, root, device, model)
        if model != "llama":
            cfg = info["config"]
            row = {"model": model, "layers": cfg["num_hidden_layers"], "num_experts": cfg["num_experts"],
                   "hidden_size": cfg["hidden_size"], "moe_intermediate_size": cfg["moe_intermediate_size"],
                   "shards": info["shards"], "shard_mib": info["shard_bytes"] / MIB,
                   "layer0_experts_shards": info["layer0_experts_shards"],
                   "experts_stack_mib": info["experts_stack_bytes"] / MIB, **row}
            if "error" not in row:
                row["moe_layers"] = info["moe_layers"]
                row["all_experts_4bit"] = (row["nf4_experts"] == info["moe_layers"] and row["dense_experts"] == 0)
        row.update(checkpoint_mib=info["checkpoint_bytes"] / MIB, largest_tensor_mib=info["largest_tensor_bytes"] / MIB)
        if "model_mib" in row:
            resident = row["model_mib"]
            if model != "llama" and "cuda_peak_mib" not in row:
                resident -= row["file_backed_mib"]  # RssAnon never holds the memory-mapped tensors
            bound = (resident + row["largest_tensor_mib"]) * 1.10
            peak = row.get("cuda_peak_mib", row["peak_rss_anon_delta_mib"])
            row.update(bound_mib=bound, within_bound=peak <= bound, peak_over_model=peak / row["model_mib"])
        rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="bf16 checkpoint size (default 1.0)")
    ap.add_argument("--quick", action="store_true", help="skip the bitsandbytes load")
    ap.add_argument("--model", choices=MODELS, default="llama",
                    help="llama (default) or qwen3_moe (Qwen3-30B-A3B widths, few layers)")
    args = ap.parse_args(argv)
    rows = run(args.size_gb, args.quick, args.model)
    print(env_info())
    moe = ["layers", "shards", "layer0_experts_shards", "experts_stack_mib"] if args.model != "llama" else []
    tail = ["file_backed_mib", "nf4_experts", "dense_experts", "moe_layers", "all_experts_4bit"] \
        if args.model != "llama" else []
    print_table(rows, ["mode", *moe, "seconds", "checkpoint_mib", "model_mib", "largest_tensor_mib",
                       "peak_rss_anon_delta_mib", "cuda_peak_mib", "bound_mib", "within_bound", "peak_over_model",
                       *tail, "error"])
    print("wrote", write_csv("load" if args.model == "llama" else "load_moe", rows))


if __name__ == "__main__":
    main()
