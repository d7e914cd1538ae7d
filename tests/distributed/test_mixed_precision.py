"""FSDP2's gradient dtypes follow the mixed-precision policy for parameters that start training
after the model's first forward (O-LoRA's adapters, a plugin that unfreezes later)."""

from __future__ import annotations

import subprocess
import sys

from twoproc import ENV

# One rank over gloo is enough: FSDP2 fixes each unit's dtypes at the first forward whatever the world.
SCRIPT = """
import tempfile, torch, torch.distributed as d
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from clbench.distributed import follow_trainable

d.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
for unit in (*model, model):
    fully_shard(unit, mesh=mesh, mp_policy=policy)
model.requires_grad_(False)
with torch.no_grad():
    model(torch.ones(2, 4))  # the first forward: nothing trains yet
model[0].requires_grad_(True)
follow_trainable(model)
model(torch.ones(2, 4)).sum().backward()
print(model[0].weight.grad.dtype, model[1].weight.grad)
"""


def test_parameters_that_start_training_later_get_fp32_gradients():
    """Without follow_trainable the gradient stays bf16 and torch refuses to assign it to the fp32
    parameter ("grad_dtype"): O-LoRA's crash at its first step under FSDP2 bf16-mixed."""
    cmd = [sys.executable, "-c", SCRIPT]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["torch.float32", "None"]  # fp32 where it trains, none where frozen
