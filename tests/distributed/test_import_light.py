"""`import qpeft` (and `qpeft.distributed`) never load the distributed engines (style guide §11). Using a
QLinearNF4 loads torch._dynamo (torch.library custom ops), which itself imports torch.distributed.fsdp: past
that point only DeepSpeed / transformers / PEFT are checked."""
from __future__ import annotations

import subprocess
import sys

CODE = """
import sys, torch
def loaded(prefixes):
    return [m for m in sys.modules if m.startswith(prefixes)]
ENGINES = ('torch.distributed.fsdp', 'torch.distributed.tensor', 'torch.distributed.checkpoint', 'deepspeed',
           'accelerate', 'transformers', 'peft')
import qpeft
from qpeft import QLinearNF4, add_lora, save_adapter
import qpeft.distributed
print(loaded(ENGINES))
layer = QLinearNF4(64, 32, compute_dtype=torch.float32)
sd = layer.state_dict(); y = layer(torch.randn(2, 64))
print(loaded(('deepspeed', 'accelerate', 'transformers', 'peft')))
"""


def test_import_qpeft_loads_no_engine():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-2:] == ["[]", "[]"]
