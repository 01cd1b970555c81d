import copy
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lmtrain.config import ModelConfig, OptimizerConfig, SchedulerConfig, SchedulerName
from lmtrain.model import GPT
from lmtrain.runs.checkpoint import read_tensors
from lmtrain.training.muon import NS_COEFFICIENTS, Muon, orthogonalize
from lmtrain.training.optim import build_optimizer, lr_at, set_lr, warmup_steps
from lmtrain.training.state import load_optimizer_state, optimizer_state


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
    decay, no_decay = build_optimizer(model, OptimizerConfig(weight_decay=0.1), "cpu").param_groups
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


# ---- per-role learning rates, Muon beside AdamW, and the combined optimizer's state ----

def tiny_gpt(**overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=20, d_model=16, n_heads=2, n_layers=2, d_ff=32, block_size=8, tie_embeddings=False)
    return GPT(ModelConfig(**{**cfg, **overrides}))


def test_embedding_and_head_lrs_get_their_own_groups_and_the_schedule_scales_every_group():
    model = tiny_gpt()
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, embedding_lr=1e-2, head_lr=4e-3), "cpu")
    by_role = {g["roles"]: g for g in opt.param_groups}
    assert set(by_role) == {"matrix", "head", "embedding", "other"}
    assert [p is model.lm_head.weight for p in by_role["head"]["params"]] == [True]
    set_lr(opt, 5e-4)  # half of optimizer.lr: every group at half its peak
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 2e-3, 5e-3, 5e-4])


def test_muon_takes_exactly_the_hidden_matrices_and_adamw_everything_else():
    for tied in (False, True):
        model = tiny_gpt(tie_embeddings=tied, mlp="relu2")
        opt = build_optimizer(model, OptimizerConfig(name="muon", lr=1e-3, muon_lr=0.02), "cpu")
        muon, adamw = opt.optimizers
        assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
        grouped = [id(p) for g in opt.param_groups for p in g["params"]]
        assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one group
        hidden = {id(p) for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2}
        assert {id(p) for g in muon.param_groups for p in g["params"]} == hidden
        assert id(model.tok_emb.weight) in grouped and (tied or id(model.lm_head.weight) not in hidden)
        assert muon.param_groups[0]["lr"] == 0.02 and muon.param_groups[0]["weight_decay"] == 0.0
        set_lr(opt, 5e-4)
        assert muon.param_groups[0]["lr"] == pytest.approx(0.01)


def test_muon_on_a_cpu_orthogonalizes_in_float32_and_otherwise_is_torchs_step():
    ours, torchs, twin = tiny_gpt(), tiny_gpt(), tiny_gpt()
    start = ours.blocks[0].mlp.fc.weight.detach().clone()
    idx = torch.randint(0, 20, (4, 8))
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="original")
    opts = [Muon([ours.blocks[0].mlp.fc.weight], float32_orthogonalization=True, **settings),
            torch.optim.Muon([torchs.blocks[0].mlp.fc.weight], **settings),
            Muon([twin.blocks[0].mlp.fc.weight], float32_orthogonalization=False, **settings)]
    for _ in range(3):
        for model, opt in zip((ours, torchs, twin), opts, strict=True):
            model(idx, idx).backward()
            opt.step()
            opt.zero_grad()
    weights = [m.blocks[0].mlp.fc.weight for m in (ours, torchs, twin)]
    assert torch.equal(weights[1], weights[2])  # bf16: torch's own step, unchanged
    ours_step, torchs_step = weights[0] - start, weights[1] - start
    assert 0 < (ours_step - torchs_step).norm() < 0.1 * torchs_step.norm()  # fp32 vs bf16 iterations: close
    singular = torch.linalg.svdvals(orthogonalize(torch.randn(64, 16), NS_COEFFICIENTS, 5, 1e-7))
    assert singular.min() > 0.5 and singular.max() < 1.5  # every direction gets a step of about the same size


def test_the_combined_optimizer_round_trips_through_a_checkpoint_file_exactly(tmp_path):
    cfg = OptimizerConfig(name="muon", lr=3e-3, muon_lr=0.02, embedding_lr=1e-2)
    batches = [torch.randint(0, 20, (4, 8)) for _ in range(6)]

    def train(model, opt, steps):
        for idx in steps:
            model(idx, idx).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    model = tiny_gpt()
    opt = build_optimizer(model, cfg, "cpu")
    train(model, opt, batches[:3])
    tensors, metadata = optimizer_state(opt)
    assert any(".momentum_buffer" in k for k in tensors) and any(".exp_avg_sq" in k for k in tensors)
    save_file(tensors, str(tmp_path / "optimizer.safetensors"), metadata={"format": "pt", **metadata})
    saved = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    train(model, opt, batches[3:])  # the uninterrupted run goes on

    resumed = tiny_gpt()
    resumed.load_state_dict(weights)
    fresh = build_optimizer(resumed, cfg, "cpu")
    load_optimizer_state(read_tensors(tmp_path / "optimizer.safetensors"), fresh, tmp_path / "optimizer.safetensors")
    restored = fresh.state_dict()
    assert restored["state"].keys() == saved["state"].keys() and len(restored["state"]) == len(list(model.parameters()))
    for index, values in saved["state"].items():
        assert restored["state"][index].keys() == values.keys()
        for key, value in values.items():
            assert torch.equal(restored["state"][index][key], value), (index, key)
    assert [g["params"] for g in restored["param_groups"]] == [g["params"] for g in saved["param_groups"]]
    train(resumed, fresh, batches[3:])
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_wsd_warms_up_holds_the_peak_then_decays_linearly_to_the_floor():
    cfg = SchedulerConfig(name=SchedulerName.wsd, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    lrs = [lr_at(step, 100, 2.0, cfg) for step in range(100)]
    assert lrs[:10] == pytest.approx([2.0 * (s + 1) / 11 for s in range(10)])  # warm-up
    assert lrs[10:80] == [2.0] * 70  # stable: the peak until the last 20% of the steps
    assert lrs[79] == 2.0 and lrs[80] == pytest.approx(2.0 - 1.8 / 20) and lrs[99] == pytest.approx(0.2)
    steps = [b - a for a, b in zip(lrs[80:-1], lrs[81:], strict=True)]
    assert steps == pytest.approx([-1.8 / 20] * 19)  # a straight line down to min_lr_ratio at the last step
    assert lr_at(99, 100, 2.0, SchedulerConfig(name=SchedulerName.wsd, warmup_steps=0, min_lr_ratio=0.0)) == 0.0


def test_a_warmup_fraction_is_a_share_of_the_run_and_replaces_warmup_steps():
    cfg = SchedulerConfig(name=SchedulerName.cosine, warmup_steps=700, warmup_fraction=0.1, min_lr_ratio=0.1)
    assert warmup_steps(cfg, 200) == 20 and warmup_steps(SchedulerConfig(warmup_steps=7), 200) == 7
    steps = SchedulerConfig(name=SchedulerName.cosine, warmup_steps=20, min_lr_ratio=0.1)
    assert [lr_at(s, 200, 1.0, cfg) for s in range(200)] == [lr_at(s, 200, 1.0, steps) for s in range(200)]


def test_warmup_steps_and_fraction_on_one_command_line_are_refused_by_name():
    from lmtrain.config import TrainConfig
    from lmtrain.config.overrides import check_overrides
    from lmtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="scheduler.warmup_steps=10 and scheduler.warmup_fraction=0.1 say the same "
                                          "thing two ways: give one of them"):
        check_overrides(TrainConfig, ["scheduler.warmup_steps=10", "scheduler.warmup_fraction=0.1"])
    check_overrides(TrainConfig, ["model=gpt_small", "scheduler.warmup_fraction=0.1"])  # the preset's steps give way
