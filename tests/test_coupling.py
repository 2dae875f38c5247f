"""GradientCoupler on models that are not ours: groups, training dynamics, None gradients, DDP."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn

from itconv_fast import GradientCoupler, groups_from_blocks


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bn1 = nn.BatchNorm1d(c)
        self.fc1 = nn.Linear(c, c, bias=False)
        self.bn2 = nn.BatchNorm1d(c)
        self.fc2 = nn.Linear(c, c)

    def forward(self, z):
        return z + self.fc2(torch.relu(self.bn2(self.fc1(torch.relu(self.bn1(z))))))


class ToyResNet(nn.Module):
    """Two stages of same-shaped blocks: a model the toolkit knows nothing about."""

    def __init__(self, c=8, T=4, recurrent_init=True):
        super().__init__()
        self.inp = nn.Linear(5, c)
        self.stage1 = nn.ModuleList(Block(c) for _ in range(T))
        self.mid = nn.Linear(c, 2 * c)
        self.stage2 = nn.ModuleList(Block(2 * c) for _ in range(T))
        self.out = nn.Linear(2 * c, 3)
        if recurrent_init:
            for stage in (self.stage1, self.stage2):
                for block in stage[1:]:
                    block.load_state_dict(stage[0].state_dict())

    def forward(self, x):
        z = self.inp(x)
        for b in self.stage1:
            z = b(z)
        z = self.mid(z)
        for b in self.stage2:
            z = b(z)
        return self.out(z)


def stage_params_identical(stage):
    ref = dict(stage[0].named_parameters())
    return all(torch.equal(p, ref[n]) for b in stage[1:] for n, p in b.named_parameters())


def test_groups_from_blocks_pairs_same_named_parameters():
    model = ToyResNet(T=3)
    groups = groups_from_blocks(model.stage1, model.stage2)
    names = [n for n, _ in model.stage1[0].named_parameters()]
    assert len(groups) == 2 * len(names)
    for group, name in zip(groups, names):
        assert [id(p) for p in group] == [id(dict(b.named_parameters())[name]) for b in model.stage1]


def test_groups_from_blocks_rejects_different_blocks():
    blocks = nn.ModuleList([Block(4), Block(5)])
    with pytest.raises(ValueError, match="stage 0, block 1"):
        groups_from_blocks(blocks)


def test_coupler_rejects_bad_settings_at_construction():
    model = ToyResNet()
    with pytest.raises(ValueError, match="lam"):
        GradientCoupler(groups_from_blocks(model.stage1), lam=2.0)
    with pytest.raises(ValueError, match="skip_first"):
        GradientCoupler(groups_from_blocks(model.stage1), lam=0.5, skip_first=4)
    with pytest.raises(TypeError, match="coupling_groups"):
        GradientCoupler(model, lam=0.5)


def train(model, coupler, steps=50, accumulate=1, seed=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            x = torch.randn(16, 5, generator=gen)
            y = torch.randint(0, 3, (16,), generator=gen)
            nn.functional.cross_entropy(model(x), y).div(accumulate).backward()
        if coupler is not None:
            coupler()
        opt.step()


def test_lam_one_keeps_recurrent_blocks_identical_for_50_sgd_steps():
    model = ToyResNet(T=5)
    coupler = GradientCoupler(groups_from_blocks(model.stage1, model.stage2), lam=1.0)
    train(model, coupler, steps=50)
    assert stage_params_identical(model.stage1)
    assert stage_params_identical(model.stage2)
    # ... while the network did change, and without coupling the blocks drift apart.
    untrained = ToyResNet(T=5)
    uncoupled = copy.deepcopy(untrained)
    train(uncoupled, None, steps=5)
    assert not stage_params_identical(uncoupled.stage1)


def test_intermediate_lam_pulls_blocks_together():
    def spread(model):
        w = torch.stack([b.fc1.weight for b in model.stage1])
        return (w - w.mean(0)).norm().item()

    torch.manual_seed(1)
    base = ToyResNet(T=4, recurrent_init=False)
    spreads = {}
    for lam in [0.0, 0.5, 0.9]:
        model = copy.deepcopy(base)
        train(model, GradientCoupler(groups_from_blocks(model.stage1), lam=lam), steps=30)
        spreads[lam] = spread(model)
    assert spreads[0.9] < spreads[0.5] < spreads[0.0]


def test_none_gradient_counts_as_zero():
    blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(3))
    x = torch.randn(4, 3)
    blocks[0](x).sum().backward()
    blocks[2](x).pow(2).sum().backward()  # block 1 takes no part: its grads stay None
    g0, g2 = blocks[0].weight.grad.clone(), blocks[2].weight.grad.clone()
    GradientCoupler(groups_from_blocks(blocks), lam=0.5)()
    mean = (g0 + g2) / 3
    torch.testing.assert_close(blocks[0].weight.grad, 0.5 * g0 + 0.5 * mean)
    torch.testing.assert_close(blocks[1].weight.grad, 0.5 * mean)
    torch.testing.assert_close(blocks[2].weight.grad, 0.5 * g2 + 0.5 * mean)


def test_gradient_accumulation_matches_full_batch():
    """Coupling once after accumulating equals coupling the full-batch gradient (coupling is linear)."""
    torch.manual_seed(0)
    model = ToyResNet(T=3, recurrent_init=False)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))

    def coupled_grads(chunks):
        m = copy.deepcopy(model).eval()  # eval: BN statistics do not depend on the chunking
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks)):
            nn.functional.cross_entropy(m(xc), yc, reduction="sum").backward()
        GradientCoupler(groups_from_blocks(m.stage1, m.stage2), lam=0.7)()
        return [p.grad for p in m.parameters()]

    for a, b in zip(coupled_grads(1), coupled_grads(4)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _ddp_worker(rank, world, port, state, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = ToyResNet(T=3, recurrent_init=False)
        model.load_state_dict(state)
        ddp = nn.parallel.DistributedDataParallel(model)
        coupler = GradientCoupler(groups_from_blocks(model.stage1, model.stage2), lam=0.6)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        gen = torch.Generator().manual_seed(123)
        for _ in range(5):
            x, y = torch.randn(8 * world, 5, generator=gen), torch.randint(0, 3, (8 * world,), generator=gen)
            xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(xs), ys).backward()  # DDP all-reduces inside backward
            coupler()
            opt.step()
        torch.save(model.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears gloo down (a rare SIGABRT at exit otherwise)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_stay_identical(tmp_path):
    torch.manual_seed(0)
    state = ToyResNet(T=3, recurrent_init=False).state_dict()
    mp.spawn(_ddp_worker, args=(2, free_port(), state, str(tmp_path)), nprocs=2, join=True)
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name in s0:
        if "running" in name or "num_batches" in name:
            continue  # BN statistics are per rank (no SyncBatchNorm)
        assert torch.equal(s0[name], s1[name]), name
    assert not torch.equal(s0["stage1.0.fc1.weight"], state["stage1.0.fc1.weight"])
