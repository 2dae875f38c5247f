"""Robustness of a trained network: error under Gaussian input noise, under an L-infinity PGD attack, and the
share of examples certified by the network's Lipschitz bound.

    report = robustness_report(model, (x, y), sigmas=(0.1, 0.3), epsilons=(0.01, 0.03), loss_fn=None)
    report.noise_errors, report.pgd_errors, report.lipschitz_bound, report.certified_shares

Sizes are in the units of the network's input (after the data's normalisation); inputs are not clamped to a
pixel range. The attack (Madry et al. 2018) starts from a uniform point of the eps-ball and takes `pgd_steps`
signed-gradient steps of 2.5 eps / steps on the loss, with gradients through every block of every stage (a plain
forward in eval mode; spectral corrections without a power step); an example counts as broken when it is wrong
on the clean input or at any iterate, and a broken one leaves the batch (as AutoAttack attacks only the examples
still right), so the attack's cost falls as it succeeds. Certification (Tsuzuku, Sato & Sugiyama 2018): an
example whose margin m (its true output over the best wrong one; Digitclutter: the lowest true digit over the
highest other) exceeds sqrt(2) L r keeps its answer within the L2 ball of radius r, L the network's Lipschitz
bound (`iter_resnet_lipschitz_bound`); at an L-infinity eps the ball of radius sqrt(d) eps covers the eps-box
(d the input's size).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..io.checkpoint import json_safe
from ..models.iter_resnet import IterResNet
from ..models.residual import check_residual_model
from ..models.stage_spectral_norm import fold_batchnorm, stacked_bn_scales
from ..ops.spectral import gram_spectral_bound
from .evaluator import Tally, check_batch_size, evaluate_batches, top1_wrong

__all__ = [
    "robustness_report",
    "RobustnessReport",
    "iter_resnet_lipschitz_bound",
    "pgd_wrong",
    "margins",
    "check_sizes",
    "check_pgd_steps",
    "DEFAULT_SIGMAS",
    "DEFAULT_EPSILONS",
]

DEFAULT_SIGMAS = (0.1, 0.2, 0.5, 1.0)
DEFAULT_EPSILONS = (0.01, 0.03, 0.1)


@dataclass
class RobustnessReport:
    clean_error: float
    sigmas: list
    noise_errors: list
    epsilons: list
    pgd_errors: list
    pgd_steps: int
    lipschitz_bound: Optional[float]  # None: not computed (not an IterResNet, or not certify)
    certified_shares: Optional[list]  # per epsilon: the share of examples certified right
    n: int

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


def check_sizes(values, name: str) -> list:
    """The noise stds or attack sizes as floats; ValueError unless each is a finite number >= 0."""
    values = [values] if isinstance(values, (int, float)) else list(values)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"robustness_report: every {name} must be a finite number >= 0, got {v!r}")
    return [float(v) for v in values]


def check_pgd_steps(pgd_steps) -> None:
    if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
        raise ValueError(f"robustness_report: pgd_steps must be an int >= 1, got {pgd_steps!r}")


def _spectral_norm(conv: torch.Tensor, gram_iterations: int) -> torch.Tensor:
    return gram_spectral_bound(conv.detach().double().unsqueeze(0), gram_iterations)[0]


def _bn_bound(bn: nn.BatchNorm2d) -> torch.Tensor:
    return stacked_bn_scales([bn]).detach().double().abs().max()


@torch.no_grad()
def iter_resnet_lipschitz_bound(model: IterResNet, gram_iterations: int = 6) -> float:
    """A certified upper bound on the L2 Lipschitz constant of an IterResNet's logits in eval mode.

    Every convolution by its Gram-iteration bound (certified for zero padding and every input size; a stride only
    subsamples), BatchNorm by its largest |scale|, ReLU 1, the global average pool 1 / sqrt(H W). A block's
    residual function f~ = conv2(relu(bn2(conv1(relu(bn1(z)))))) / c_t has L(f~) <= |conv2| |d2 conv1 d1| / c_t
    (the BN scales folded into conv1, as SPEC section 3 does: ReLU between them only shrinks differences), c_t the
    stage's spectral correction (1 without spectral normalization). An ICR stage multiplies the bound by
    prod_t (1 + L(f~_t)); a PCR stage, z_t = x + f~_t(z_{t-1}), gives L_t = 1 + L(f~_t) L_{t-1}, L_0 = 1."""
    if not isinstance(model, IterResNet):
        raise TypeError(f"iter_resnet_lipschitz_bound: expected an IterResNet, got {type(model).__name__}")
    bound = _spectral_norm(model.stem.weight, gram_iterations)
    for s, stage in enumerate(model.stages):
        if s > 0:
            transition = model.transitions[s - 1]
            bound = bound * _bn_bound(transition.bn) * _spectral_norm(transition.conv.weight, gram_iterations)
        conv1, conv2, d1, d2 = (w.detach().double() for w in stage.spectral_weights())
        f = gram_spectral_bound(fold_batchnorm(conv1, d1, d2), gram_iterations) * gram_spectral_bound(
            conv2, gram_iterations
        )
        if stage.sn is not None:
            was = stage.training
            stage.eval()
            try:
                f = f / stage.corrections().detach().double()
            finally:
                stage.train(was)
        if stage.pcr:
            stage_bound = torch.ones((), dtype=torch.float64)
            for lf in f:
                stage_bound = 1 + lf * stage_bound
        else:
            stage_bound = (1 + f).prod()
        bound = bound * stage_bound
    head_bn, linear = model.head[0], model.head[-1]
    side = model.config["input_size"] // 2 ** (len(model.stages) - 1)
    pool = 1.0 / side  # the mean over side x side positions: 1 / sqrt(side^2)
    head = _bn_bound(head_bn) * pool * torch.linalg.matrix_norm(linear.weight.detach().double(), ord=2)
    return float(bound * head)


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example: the true output minus the best wrong one (class targets), or the lowest true output minus the
    highest other (multi-label 0/1 targets of the logits' shape). Negative: misclassified."""
    if y.shape == logits.shape:
        true = y > 0.5
        lowest_true = logits.masked_fill(~true, float("inf")).amin(dim=1)
        highest_other = logits.masked_fill(true, float("-inf")).amax(dim=1)
        return lowest_true - highest_other
    if logits.dim() != 2:
        raise ValueError("robustness: certification needs [N, K] logits (sequence outputs are not supported)")
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(dim=1)
    return true - others


def _default_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if y.shape == logits.shape:
        return nn.functional.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction="none").sum(1)
    return nn.functional.cross_entropy(logits, y, reduction="none")


@contextlib.contextmanager
def _frozen(model):
    """The parameters without gradients for the block: an attack needs the input's gradient only."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def pgd_wrong(
    model,
    x,
    y,
    eps: float,
    steps: int,
    loss_fn: Callable,
    wrong_fn: Callable,
    generator: torch.Generator,
    clean_wrong: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per example: whether an L-infinity PGD attack of size eps breaks it (module docstring): wrong on the clean
    input (clean_wrong, if the caller has it), or at any iterate. A broken example leaves the batch: the attack
    goes on for the others only."""
    broken = (wrong_fn(model(x), y) if clean_wrong is None else clean_wrong).bool().clone()
    if eps == 0:
        return broken
    step = 2.5 * eps / steps
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)  # the whole batch's: same draws
    active = (~broken).nonzero().squeeze(1)
    xa, ya, delta = x[active], y[active], ((2 * noise - 1) * eps)[active]
    with _frozen(model):
        for _ in range(steps):
            if active.numel() == 0:
                return broken
            delta.requires_grad_(True)
            with torch.enable_grad():
                logits = model(xa + delta)
                (grad,) = torch.autograd.grad(loss_fn(logits, ya).sum(), delta)
            now = wrong_fn(logits.detach(), ya).bool()
            broken[active[now]] = True
            keep = ~now
            active, xa, ya = active[keep], xa[keep], ya[keep]
            delta = (delta.detach()[keep] + step * grad[keep].sign()).clamp(-eps, eps)
    if active.numel():
        broken[active] = wrong_fn(model(xa + delta), ya).bool()
    return broken


def robustness_report(
    model,
    data: Union[tuple, Iterable],
    *,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    pgd_steps: int = 10,
    error_fn: Optional[Callable] = None,
    loss_fn: Optional[Callable] = None,
    batch_size: int = 512,
    seed: int = 0,
    certify: Optional[bool] = None,
) -> RobustnessReport:
    """Errors under Gaussian noise (std sigma) and PGD (L-infinity eps), and the shares certified at each eps
    (module docstring).

    error_fn: (logits, targets) -> per-example wrong; default top-1 (multi-label targets need their own, e.g. the
    exact digit set, as `benefits_of_run` passes). loss_fn: what the attack ascends, per example; default
    cross-entropy, or summed BCE for multi-label targets. The noise and the attacks' starts are drawn from `seed`:
    the same call gives the same numbers. certify: compute the Lipschitz bound and the certified shares (an
    IterResNet's; default: when it is spectrally normalised, since without it the bound is astronomically loose
    (1e12 on a quick-preset network) and takes as long as the rest).
    """
    check_residual_model(model, "robustness_report")
    sigmas, epsilons = check_sizes(sigmas, "sigma"), check_sizes(epsilons, "epsilon")
    check_pgd_steps(pgd_steps)
    check_batch_size(batch_size, "robustness_report")
    wrong_fn = error_fn or top1_wrong
    loss_fn = loss_fn or _default_loss
    if certify is None:
        certify = isinstance(model, IterResNet) and any(stage.sn is not None for stage in model.stages)
    if certify and not isinstance(model, IterResNet):
        raise ValueError(f"robustness_report: certify needs an IterResNet's bound, not a {type(model).__name__}")
    lipschitz = iter_resnet_lipschitz_bound(model) if certify else None
    generator = torch.Generator().manual_seed(seed)
    tally = Tally()

    def per_batch(x, y):
        logits = model(x)
        clean_wrong = wrong_fn(logits, y)
        tally.add("clean", clean_wrong.sum())
        for i, sigma in enumerate(sigmas):
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            tally.add(("noise", i), wrong_fn(model(x + sigma * noise), y).sum())
        for i, eps in enumerate(epsilons):
            broken = pgd_wrong(model, x, y, eps, pgd_steps, loss_fn, wrong_fn, generator, clean_wrong)
            tally.add(("pgd", i), broken.sum())
        if lipschitz is not None:
            radius = margins(logits, y).double().clamp_min(0) / (math.sqrt(2) * lipschitz)
            d = math.sqrt(x[0].numel())
            for i, eps in enumerate(epsilons):
                tally.add(("certified", i), ((radius > d * eps) & ~clean_wrong.bool()).sum())

    n, _ = evaluate_batches(model, data, batch_size, "robustness_report", per_batch)
    return RobustnessReport(
        clean_error=tally["clean"] / n,
        sigmas=sigmas,
        noise_errors=[tally[("noise", i)] / n for i in range(len(sigmas))],
        epsilons=epsilons,
        pgd_errors=[tally[("pgd", i)] / n for i in range(len(epsilons))],
        pgd_steps=pgd_steps,
        lipschitz_bound=lipschitz,
        certified_shares=None if lipschitz is None else [tally[("certified", i)] / n for i in range(len(epsilons))],
        n=n,
    )
