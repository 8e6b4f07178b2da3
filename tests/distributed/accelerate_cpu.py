"""Run a script under `accelerate launch` on CPU-only gloo ranks with the engine its config names (FSDP or
DeepSpeed): `accelerate launch --config_file CFG tests/distributed/accelerate_cpu.py SCRIPT ARGS...`.

Test harness only, never needed on GPUs. accelerate 1.16 turns FSDP and DeepSpeed on for accelerator devices
only: on a machine without one, `PartialState._prepare_backend` finds no backend (the ranks then train as
independent single processes), and `--cpu` routes to plain DDP (MULTI_CPU; FSDP is only set in the
MULTI_GPU-like branch of `AcceleratorState.__init__`, state.py ~L947-974, DeepSpeed only `and not cpu`). This
shim gives the ranks gloo (the MULTI_CPU path) and then restores the engine the launcher's environment asks for
(ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED), as accelerate does on GPUs; the script itself runs unchanged.
With QPEFT_ACCEL_REPORT=<dir> each rank also writes <dir>/report<rank>.json: the bytes of the 4-bit storage it
holds after `Accelerator.prepare`, and a digest of the gathered bytes before and after training. Also usable
with plain `python` (one process) for the single-process reference.
"""
from __future__ import annotations

import os
import sys

import torch
from accelerate import state as acc_state
from accelerate.utils import DistributedType


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


_prepare_backend = acc_state.PartialState._prepare_backend


def _prepare_backend_cpu(self, cpu=False, sagemaker_dp=False, backend=None):
    backend_, dtype = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if backend_ is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return "gloo", DistributedType.MULTI_CPU
    return backend_, dtype


_accelerator_state_init = acc_state.AcceleratorState.__init__


def _accelerator_state_init_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and _flag("ACCELERATE_USE_FSDP") and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        acc_state.PartialState._shared_state["distributed_type"] = self.distributed_type


if not torch.cuda.is_available():
    acc_state.PartialState._prepare_backend = _prepare_backend_cpu
    acc_state.AcceleratorState.__init__ = _accelerator_state_init_cpu
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        # DeepSpeed's CPU backend builds and initialises a shared-memory all-reduce op at init_distributed
        # (only its inference all-reduce uses it; training collectives go through gloo). Built, it hung both
        # ranks here in its initialize (2 CPU ranks, other jobs on the 2 cores); skip it, as zero3_worker.py does.
        # importlib, not `import deepspeed.comm.torch as ...`: that name resolves to the attribute `torch`
        # of deepspeed.comm, which is PyTorch itself (patching it left the shm op built, and its
        # initialize aborted a rank now and then: 'terminate called without an active exception')
        import importlib

        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
        assert hasattr(ds_comm_torch, "TorchBackend"), ds_comm_torch

        ds_comm_torch.build_shm_op = lambda: None


# ------------------------------------------------------------------ what the tests read (QPEFT_ACCEL_REPORT=dir)
def _quantized(model):
    from qpeft.modules.lora_linear import is_nf4_layer

    return sorted(((f"{n}.{pn}", p) for n, m in model.named_modules() if is_nf4_layer(m)
                   for pn, p in m.named_parameters(recurse=False) if pn in ("weight", "absmax_bytes")),
                  key=lambda kv: kv[0].replace("_fsdp_wrapped_module.", ""))


def _storage(p):
    """(bytes this rank holds, bytes of the whole tensor, bytes of one dim-0 row, engine)."""
    from torch.distributed.tensor import DTensor

    row = p.element_size() * (p.shape[1] if p.dim() > 1 else 1)
    if isinstance(p, DTensor):
        local = p.to_local()
        return local.numel() * local.element_size(), p.numel() * p.element_size(), row, "fsdp2"
    if hasattr(p, "ds_tensor"):
        rows = p.ds_shape[1] if len(p.ds_shape) > 1 else 1
        return p.ds_tensor.numel() * p.ds_tensor.element_size(), p.ds_numel * p.element_size(), rows, "zero3"
    return p.numel() * p.element_size(), p.numel() * p.element_size(), row, "none"


def _digest(model) -> str:
    """sha256 over every quantized byte, gathered (collective under FSDP2 / ZeRO-3: every rank calls)."""
    import hashlib
    import contextlib

    from torch.distributed.tensor import DTensor

    params = _quantized(model)
    ctx = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters([p for _, p in params])
    h = hashlib.sha256()
    with ctx:
        for _, p in params:
            t = p.full_tensor() if isinstance(p, DTensor) else p.data
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _install_report(out_dir: str) -> None:
    import json
    from pathlib import Path

    import transformers

    class Report(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from accelerate.state import AcceleratorState

            rows = [_storage(p) for _, p in _quantized(model)]
            policy = getattr(getattr(AcceleratorState(), "fsdp_plugin", None), "mixed_precision_policy", None)
            self.r = dict(local_bytes=sum(r[0] for r in rows), full_bytes=sum(r[1] for r in rows),
                          row_bytes_sum=sum(r[2] for r in rows), engines=sorted({r[3] for r in rows}),
                          n_quantized=len(rows), digest_begin=_digest(model),
                          lora_dtypes=sorted({str(p.dtype) for n, p in model.named_parameters() if "lora_" in n}),
                          mixed_precision=AcceleratorState().mixed_precision,
                          fsdp_param_dtype=str(getattr(policy, "param_dtype", None)),
                          fsdp_groups=sorted(type(m).__name__.removeprefix("FSDP") for m in model.modules()
                                             if type(m).__name__.startswith("FSDP")))

        def on_train_end(self, args, state, control, model=None, **kwargs):
            import torch.distributed as dist

            self.r["digest_end"] = _digest(model)
            rank = dist.get_rank() if dist.is_initialized() else 0
            self.r.update(rank=rank, world_size=dist.get_world_size() if dist.is_initialized() else 1)
            Path(out_dir, f"report{rank}.json").write_text(json.dumps(self.r))

    init = transformers.Trainer.__init__

    def __init__(self, *a, callbacks=None, **kw):
        init(self, *a, callbacks=[*(callbacks or []), Report()], **kw)

    transformers.Trainer.__init__ = __init__

if __name__ == "__main__":
    from rank_exit import run_then_exit  # the directory of this file is sys.path[0]

    if os.environ.get("QPEFT_ACCEL_REPORT"):
        _install_report(os.environ["QPEFT_ACCEL_REPORT"])
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    run_then_exit(script)  # os._exit(0) after a clean end: see rank_exit.py
