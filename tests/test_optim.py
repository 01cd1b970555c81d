import math

import pytest
import torch
from torch import nn

from lmtrain.config import OptimizerConfig, SchedulerConfig, SchedulerName
from lmtrain.optim import build_optimizer, lr_at, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied


def test_decay_only_on_weight_matrices():
    model = Tiny()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.lin.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model.emb.weight), id(model.lin.bias), id(model.norm.weight),
                                                    id(model.norm.bias)}


def test_optimizer_takes_the_configured_settings():
    opt = build_optimizer(Tiny(), OptimizerConfig(lr=1e-3, betas=[0.8, 0.95], weight_decay=0.2), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["betas"] == (0.8, 0.95)


@pytest.mark.parametrize("name", list(SchedulerName))
def test_warmup_rises_linearly_to_the_peak(name):
    cfg = SchedulerConfig(name=name, warmup_steps=9, min_lr_ratio=0.1)
    assert lr_at(0, 100, 1.0, cfg) == pytest.approx(0.1)
    assert lr_at(4, 100, 1.0, cfg) == pytest.approx(0.5)
    assert lr_at(9, 100, 1.0, cfg) == pytest.approx(1.0)


def test_decay_shapes_end_at_min_lr():
    cos = SchedulerConfig(name=SchedulerName.cosine, warmup_steps=10, min_lr_ratio=0.1)
    lin = SchedulerConfig(name=SchedulerName.linear, warmup_steps=10, min_lr_ratio=0.0)
    const = SchedulerConfig(name=SchedulerName.constant, warmup_steps=10)
    assert lr_at(99, 100, 2.0, cos) == pytest.approx(0.2)
    midpoint = 10 + (99 - 10) / 2
    assert lr_at(int(midpoint), 100, 2.0, cos) == pytest.approx(0.2 + 0.9 * (1 + math.cos(math.pi * 44 / 89)), rel=1e-6)
    assert lr_at(99, 100, 2.0, lin) == pytest.approx(0.0)
    assert lr_at(99, 100, 2.0, const) == 2.0


def test_fused_adamw_is_the_cpu_default_and_matches_the_loop():
    torch.manual_seed(0)
    model, twin = nn.Linear(8, 8), nn.Linear(8, 8)
    twin.load_state_dict(model.state_dict())
    fused = build_optimizer(model, OptimizerConfig(lr=1e-2, weight_decay=0.1), "cpu")
    loop = build_optimizer(twin, OptimizerConfig(lr=1e-2, weight_decay=0.1, fused=False), "cpu")
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for _ in range(5):
        x = torch.randn(4, 8)
        for m, opt in [(model, fused), (twin, loop)]:
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
