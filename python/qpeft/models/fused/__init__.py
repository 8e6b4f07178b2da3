"""The fused training path (issue 23): `qpeft.fuse(model)` / `qpeft.unfuse(model)` swap the fused modules into a
transformers model and compute the CausalLM loss through `qpeft.linear_cross_entropy`.

Kept here: the per-family module swaps (one module per family: llama, mistral, qwen2, qwen3, gemma2, gemma3), the
patched CausalLM forward, and the options of `fuse` (packing, checkpoint offload). Their kernels live in the op
stack under their own stems (`linear_cross_entropy`, `rmsnorm`, `rope`, `swiglu`); the fused LoRA MLP / QKV
blocks are autograd Functions (`autograd/lora_mlp.py`, `autograd/lora_qkv.py`); their modules in `modules/`.
transformers is imported only when `fuse` is called.
"""
