"""Robustness: PGD against noise and the clean error, the Lipschitz bound against the network's Jacobians,
certification against the attack."""

import math

import pytest
import torch
from torch import nn

from itconv_fast.measures import RobustnessReport, robustness_report
from itconv_fast.measures.evaluator import top1_wrong
from itconv_fast.measures.robustness import iter_resnet_lipschitz_bound, margins, pgd_wrong
from itconv_fast.models import IterResNet, ResidualStack


def tiny(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(num_classes=3, in_channels=1, width=2, blocks=2, stages=2, input_size=4)
    args.update(kw)
    model = IterResNet(**args).double()
    with torch.no_grad():  # BatchNorm statistics and affine parts away from their initial identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.3, 2.0)
                m.running_mean.normal_()
                m.weight.normal_()
                m.bias.normal_()
    model.refresh_spectral(200)
    return model.eval()


@pytest.mark.parametrize("kw", [{}, {"pcr": True}, {"sn_mu": 0.7}, {"sn_mu": 0.7, "pcr": True}], ids=str)
def test_the_lipschitz_bound_holds_for_the_networks_jacobians(kw):
    """Brute force: the exact spectral norm of the logits' Jacobian at many inputs never exceeds the bound."""
    model = tiny(**kw)
    bound = iter_resnet_lipschitz_bound(model)
    gen = torch.Generator().manual_seed(1)
    largest = 0.0
    for _ in range(40):
        x = 3 * torch.randn(1, 1, 4, 4, generator=gen, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda v: model(v.view(1, 1, 4, 4))[0], x.flatten())
        largest = max(largest, float(torch.linalg.matrix_norm(jac, ord=2)))
    assert 0 < largest <= bound
    if "sn_mu" not in kw:  # spectral normalization brings the bound down
        assert bound > iter_resnet_lipschitz_bound(tiny(sn_mu=0.7, **kw))


def test_margins_of_classes_and_of_digit_sets():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    assert torch.equal(margins(logits, torch.tensor([0, 0])), torch.tensor([1.0, -5.0]))
    digits = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert torch.equal(margins(logits, digits), torch.tensor([1.0, -1.0]))


def trained(model, steps=150, seed=0):
    """The model fitted to a separable task (the sign of the image's mean), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = (x.mean((1, 2, 3)) > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    test = torch.randn(128, 1, 4, 4, generator=gen, dtype=torch.float64)
    return model, (test, (test.mean((1, 2, 3)) > 0).long())


def test_pgd_at_zero_is_the_clean_error_and_never_weaker_than_noise_of_its_size():
    model, (x, y) = trained(IterResNet(2, 1, width=4, blocks=2, stages=1, input_size=4).double())
    with torch.no_grad():
        clean = top1_wrong(model(x), y)
    assert clean.double().mean() < 0.15
    report = robustness_report(model, (x, y), sigmas=[0.0], epsilons=[0.0, 0.05, 0.2], batch_size=50)
    assert report.pgd_errors[0] == report.clean_error == report.noise_errors[0] == float(clean.double().mean())
    gen = torch.Generator().manual_seed(5)
    for eps, attacked in zip(report.epsilons[1:], report.pgd_errors[1:]):
        corner = eps * torch.randint(0, 2, x.shape, generator=gen).double().mul(2).sub(1)  # the box's corners
        with torch.no_grad():
            noisy = float(top1_wrong(model(x + corner), y).double().mean())
        assert attacked >= noisy and attacked >= report.clean_error
    assert report.pgd_errors[2] > report.pgd_errors[1] > report.clean_error  # the attack bites, more with eps


def test_certified_examples_survive_the_attack():
    model, (x, y) = trained(
        IterResNet(2, 1, width=4, blocks=2, stages=1, input_size=4, sn_mu=0.5, pcr=True).double(), steps=300
    )
    report = robustness_report(model, (x, y), sigmas=[], epsilons=[0.0, 0.002, 0.01], pgd_steps=20)
    assert report.lipschitz_bound > 0 and report.certified_shares[0] == pytest.approx(1 - report.clean_error)
    for certified, attacked in zip(report.certified_shares, report.pgd_errors):
        assert certified <= 1 - attacked + 1e-12
    assert report.certified_shares == sorted(report.certified_shares, reverse=True)
    # Per example: every certified one stays right under the attack.
    with torch.no_grad():
        logits = model(x)
    radius = margins(logits, y).clamp_min(0) / (math.sqrt(2) * report.lipschitz_bound)
    eps = 0.002
    certified = radius > 4 * eps  # sqrt(16) eps
    broken = pgd_wrong(model, x, y, eps, 20, nn.functional.cross_entropy, top1_wrong, torch.Generator().manual_seed(0))
    assert certified.any() and not (certified & broken).any()


def whole_batch_pgd(model, x, y, eps, steps, generator):
    """The attack written out on the whole batch for every step: broken when wrong clean or at any iterate."""
    with torch.no_grad():
        broken = top1_wrong(model(x), y)
    delta = (2 * torch.rand(x.shape, generator=generator, dtype=x.dtype) - 1) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model(x + delta)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y, reduction="none").sum(), delta)
        broken = broken | top1_wrong(logits.detach(), y)
        delta = (delta.detach() + 2.5 * eps / steps * grad.sign()).clamp(-eps, eps)
    with torch.no_grad():
        return broken | top1_wrong(model(x + delta), y)


@pytest.mark.parametrize("eps", [0.02, 0.1, 0.5])
def test_pgd_where_broken_examples_leave_the_batch_equals_the_whole_batch_attack(eps):
    model, (x, y) = trained(IterResNet(2, 1, width=4, blocks=2, stages=2, input_size=4, pcr=True).double())
    loss = lambda o, t: nn.functional.cross_entropy(o, t, reduction="none")  # noqa: E731
    with torch.no_grad():
        batched = pgd_wrong(model, x, y, eps, 12, loss, top1_wrong, torch.Generator().manual_seed(3))
    expected = whole_batch_pgd(model, x, y, eps, 12, torch.Generator().manual_seed(3))
    assert torch.equal(batched, expected) and 0 < int(batched.sum()) < len(y)
    assert all(p.requires_grad for p in model.parameters())  # the attack gives the parameters' flags back


def test_certificates_are_computed_for_spectrally_normalised_networks_unless_asked():
    model, (x, y) = trained(IterResNet(2, 1, width=4, blocks=2, stages=1, input_size=4).double())
    assert robustness_report(model, (x, y), sigmas=[], epsilons=[0.01]).certified_shares is None
    asked = robustness_report(model, (x, y), sigmas=[], epsilons=[0.01], certify=True)
    assert asked.lipschitz_bound == iter_resnet_lipschitz_bound(model) and len(asked.certified_shares) == 1
    normalised = tiny(sn_mu=0.7)
    data = torch.randn(8, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    assert robustness_report(normalised, data, sigmas=[], epsilons=[0.01]).lipschitz_bound is not None


def test_a_residual_stack_has_no_bound_and_the_same_numbers_twice():
    torch.manual_seed(0)
    stack = ResidualStack(nn.Linear(4, 6), [[nn.Sequential(nn.Linear(6, 6), nn.Tanh())] * 2], nn.Linear(6, 3)).eval()
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    first = robustness_report(stack, (x, y), sigmas=[0.5], epsilons=[0.1])
    assert isinstance(first, RobustnessReport) and first.lipschitz_bound is None and first.certified_shares is None
    assert first.to_dict() == robustness_report(stack, (x, y), sigmas=[0.5], epsilons=[0.1]).to_dict()
    with pytest.raises(ValueError, match="certify needs an IterResNet"):
        robustness_report(stack, (x, y), certify=True)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"sigmas": [-0.1]}, "sigma"),
        ({"epsilons": [float("nan")]}, "epsilon"),
        ({"epsilons": [True]}, "epsilon"),
        ({"pgd_steps": 0}, "pgd_steps"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_sizes_are_refused(kw, match):
    model = tiny()
    with pytest.raises(ValueError, match=match):
        robustness_report(model, (torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1])), **kw)
