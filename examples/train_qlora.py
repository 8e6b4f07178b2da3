"""QLoRA fine-tuning of a causal LM with transformers.Trainer on a qpeft 4-bit base: an ordinary Trainer script.

It runs unchanged on one process and under accelerate's launchers (the launcher alone picks the engine):

    python examples/train_qlora.py --model PATH --output-dir out
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/train_qlora.py --model PATH ...
    accelerate launch --config_file examples/accelerate_deepspeed_zero3.yaml examples/train_qlora.py --model PATH ...

Nothing below knows about FSDP2 or DeepSpeed: qpeft's layers shard under both (see examples/README.md).
The data is synthetic (random token ids from the model's vocabulary, seeded) so that the script needs no dataset
download; replace `RandomTokens` with your tokenized dataset. The adapter is written to
<output-dir>/adapter (adapter_model.safetensors + adapter_config.json, PEFT's format, no base weights);
checkpoints (--save-steps) are adapter-only too and resume with --resume-from-checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os

import peft
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, set_seed

import qpeft
from qpeft._io import atomic_write_text


class RandomTokens(torch.utils.data.Dataset):
    """`n` sequences of `seq_len` token ids in [3, vocab_size), fixed by `seed`; every token is a label."""

    def __init__(self, vocab_size: int, n: int, seq_len: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab_size, (n, seq_len), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a causal LM checkpoint (directory or Hub id)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=2, help="per device (per rank)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="the 4-bit matmul's dtype (QLoRA's default bf16)")
    p.add_argument("--bf16", action="store_true", help="TrainingArguments(bf16=True): bf16 autocast / mixed precision")
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: no checkpoints)")
    p.add_argument("--resume-from-checkpoint", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="TrainingArguments(use_cpu=True)")
    return p.parse_args(argv)


class WriteLosses(TrainerCallback):
    """Writes the logged training losses {step: loss} (Trainer averages them over ranks) to `path`."""

    def __init__(self, path):
        self.path = path

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            losses = {h["step"]: h["loss"] for h in state.log_history if "loss" in h}
            atomic_write_text(self.path, json.dumps(losses))


def main(argv=None):
    args = parse_args(argv)
    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.max_steps, learning_rate=args.lr,
        lr_scheduler_type="linear", warmup_steps=0, logging_steps=1, report_to="none", seed=args.seed,
        data_seed=args.seed, bf16=args.bf16, use_cpu=args.cpu, dataloader_num_workers=0, disable_tqdm=True,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        # Trainer's default drops columns the model's forward does not name; ours are all forward arguments
        remove_unused_columns=False)
    set_seed(args.seed)  # the LoRA init draws from torch's RNG: the same adapters on every launcher
    model = AutoModelForCausalLM.from_pretrained(
        args.model, quantization_config=qpeft.QPeftConfig(compute_dtype=args.compute_dtype), dtype=torch.float32)
    config = qpeft.lora_config(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                               target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    data = RandomTokens(model.config.vocab_size, args.samples, args.seq_len, seed=args.seed)
    trainer = Trainer(model=model, args=training_args, train_dataset=data,
                      callbacks=[WriteLosses(os.path.join(args.output_dir, "losses.json"))])
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(os.path.join(args.output_dir, "adapter"))  # adapter only (PeftModel.save_pretrained)


if __name__ == "__main__":
    main()
