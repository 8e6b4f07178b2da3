"""What the distributed engines need from qpeft (no engine of our own; style guide §11).

- FSDP2: `shard_qlora_model` applies `torch.distributed.fsdp.fully_shard` to each decoder layer, then the root
  (torchtitan's `parallelize_llama` / torchtune's `shard_model`). QLinearNF4's quantized storage is frozen uint8
  Parameters, which FSDP2 shards, all-gathers as raw bytes and never casts (torch >= 2.12).
- DeepSpeed ZeRO-3: `zero3_config` returns the documented config (examples/deepspeed_zero3.json is the same).
- Loading without a whole model on every rank: `load_sharded_qlora(path, QPeftConfig(...), lora=... or
  adapter=...)` builds the model on meta, shards it, and fills the shards one decoder layer at a time from rank
  0, which alone reads (and quantizes, byte-identical to from_pretrained) the safetensors checkpoint; a rank
  holds its shards plus at most one layer's full tensors in flight (loading.py).
- State dicts: QLinearNF4 writes bitsandbytes' Linear4bit keys also when sharded (DTensor values, whose
  `full_tensor()` is the unsharded layer's bytes); `torch.distributed.checkpoint.state_dict.get_model_state_dict`
  works on a sharded model; `qpeft.save_adapter` gathers only the adapter and writes on rank 0. Resume:
  `load_full_state_dict(model, full_state_dict)` loads such a gathered dict (rank 0's copy) into a sharded model
  (torch's `set_model_state_dict` cannot: it matches parameter names, not bitsandbytes' keys), and
  `load_sharded_qlora(..., adapter=dir)` a saved adapter.
- Failures: whatever fails on any rank while loading (rank 0's checks, a missing file, a read error, a bad
  argument on one rank) is raised as the same exception on every rank (errors.py), never left for the other
  ranks to find as a closed connection or a hang.
- Optimizers: qpeft.optim's classes take the sharded (DTensor) parameters; their states live on the local
  shards (qpeft/optim/_sharded.py).

`import qpeft` never imports this package; it imports torch.distributed.fsdp only when called.
"""
from .fsdp2 import FSDP2_MIN_TORCH, shard_qlora_model, check_fsdp2_supported
from .loading import ShardedLoadError, load_full_state_dict, load_sharded_qlora
from .zero3 import prepare_zero3, zero3_config

__all__ = ["shard_qlora_model", "check_fsdp2_supported", "FSDP2_MIN_TORCH", "zero3_config", "prepare_zero3",
           "load_sharded_qlora", "load_full_state_dict", "ShardedLoadError"]
