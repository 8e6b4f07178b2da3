"""transformers' Trainer with optimizers=(qpeft.optim.PagedAdamW8bit(...), None): trains, checkpoints (its
optimizer.pt, read back by the Trainer) and resumes to the same parameters as an uninterrupted run."""
from __future__ import annotations

import warnings

import pytest
import torch

import qpeft.optim as qo

from utils import tiny_llama

transformers = pytest.importorskip("transformers")


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=12):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 128, (n, seq), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(out, max_steps, model):
    # constant lr: a linear schedule over max_steps=2 would differ from the 4-step run's first two steps
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                                          save_steps=2, save_strategy="steps", logging_steps=1, report_to=[],
                                          use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                                          disable_tqdm=True, lr_scheduler_type="constant")
    opt = qo.PagedAdamW8bit(model.parameters(), lr=3e-3)
    return transformers.Trainer(model=model, args=args, train_dataset=_Data(), optimizers=(opt, None))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_trainer_trains_checkpoints_and_resumes(tmp_path):
    full = tiny_llama().train()
    t_full = _trainer(tmp_path / "full", 4, full)
    t_full.train()
    losses = [h["loss"] for h in t_full.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    opt = t_full.optimizer
    w = full.model.layers[0].self_attn.q_proj.weight  # 64 x 64 = 4096 elements: 8-bit states
    assert opt.state[w]["state1"].dtype == torch.uint8 and opt.state[w]["step"] == 4

    part = tiny_llama().train()
    _trainer(tmp_path / "part", 2, part).train()
    ckpt = tmp_path / "part" / "checkpoint-2"
    assert (ckpt / "optimizer.pt").exists()
    resumed = tiny_llama(seed=7).train()
    t_res = _trainer(tmp_path / "part", 4, resumed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_res.train(resume_from_checkpoint=str(ckpt))
    assert t_res.optimizer.state[resumed.model.layers[0].self_attn.q_proj.weight]["step"] == 4
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
