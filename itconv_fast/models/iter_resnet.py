"""The paper's ResNet family (SPEC section 1): pre-activation blocks, ICR/PCR updates, spectral norms.

    model = IterResNet(num_classes=10, in_channels=1, width=16, blocks=16, stages=3, sn_mu=0.95)
    model.stem, model.stages[s].blocks[t] (bn1, conv1, bn2, conv2, residual(z)), model.transitions[s],
    model.head, model.pcr

Block update: z_t = z_{t-1} + f~_t(z_{t-1}) (ordinary, ICR) or z_t = x_s + f~_t(z_{t-1}) (PCR), with
f~_t = f_t / c_t under spectral normalization (itconv_fast.models.stage_spectral_norm) and f~_t = f_t without it.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import nn

from ..io.checkpoint import CheckpointError, load_checkpoint_state
from ..nn.coupling import groups_from_blocks
from ..nn.layouts import GlobalAvgPool2d, to_memory_format
from ..nn.norm import batch_norm_relu
from .stage_spectral_norm import StageSpectralNorm, check_mu, stacked_bn_scales

__all__ = ["IterResNet", "Stage", "Block", "Transition", "load_checkpoint", "model_from_state", "INITS"]

INITS = ("nonrecurrent", "recurrent")


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _bn_relu(bn: nn.BatchNorm2d, z: torch.Tensor, fused: bool) -> torch.Tensor:
    # Fused on the CPU only, where it was measured: a GPU step at these widths is launch-bound, and the fused
    # kernel takes 9 launches where cuDNN's BatchNorm and ATen's ReLU take 4 (not yet measured on a GPU).
    return batch_norm_relu(bn, z) if fused and z.device.type == "cpu" else torch.relu(bn(z))


class Block(nn.Module):
    """One residual block: f(z) = conv2(relu(bn2(conv1(relu(bn1(z))))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels)
        # A spectrally normalised stage sets these: its `corrections` (a bound method, so that a deep copy of the
        # model binds to the copied stage) and this block's place in them.
        self.stage_corrections: Optional[Callable[[], torch.Tensor]] = None
        self.index = 0
        self.nhwc_convs = False  # NCHW activations, NHWC convolutions (IterResNet.to_channels_last)
        self.fused_bn_relu = True  # BN + ReLU in one kernel (IterResNet.fuse_bn_relu)

    def f(self, z: torch.Tensor, correction: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The residual function; with `correction` c, f(z) / c. Dividing conv2's (bias-free) kernel by c
        instead of its output costs C^2 k^2 operations rather than a pass over the activations."""
        if correction is None:
            return self.f_with_conv2(z, self.conv2.weight)
        return self.f_with_conv2(z, self.conv2.weight / correction)

    def f_with_conv2(self, z: torch.Tensor, conv2_weight: torch.Tensor) -> torch.Tensor:
        """f(z) with conv2's kernel replaced by `conv2_weight` (its spectrally corrected kernel)."""
        h = _bn_relu(
            self.bn2,
            self._from_conv(self.conv1(self._to_conv(_bn_relu(self.bn1, z, self.fused_bn_relu)))),
            self.fused_bn_relu,
        )
        return self._from_conv(nn.functional.conv2d(self._to_conv(h), conv2_weight, padding=self.conv2.padding))

    def _to_conv(self, h: torch.Tensor) -> torch.Tensor:
        return to_memory_format(h, torch.channels_last) if self.nhwc_convs else h

    def _from_conv(self, h: torch.Tensor) -> torch.Tensor:
        return to_memory_format(h, torch.contiguous_format) if self.nhwc_convs else h

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        """f~(z): the residual function, divided by its spectral correction c_t when the stage has one."""
        if self.stage_corrections is None:
            return self.f(z)
        return self.f(z, self.stage_corrections()[self.index])


class Stage(nn.Module):
    """T blocks of one width; optionally spectrally normalised (one batched call per conv slot)."""

    def __init__(
        self, channels: int, blocks: int, input_size: int, pcr: bool, sn_mu: Optional[float], sn_mode: str
    ) -> None:
        super().__init__()
        self.pcr = pcr
        self.blocks = nn.ModuleList(Block(channels) for _ in range(blocks))
        self.sn = (
            StageSpectralNorm(blocks, channels, (input_size, input_size), sn_mu, sn_mode) if sn_mu is not None else None
        )
        if self.sn is not None:
            for t, block in enumerate(self.blocks):
                block.stage_corrections, block.index = self.corrections, t
        self._cached = None  # (weights' versions, corrections) for evaluation without gradients
        self.memory_format = None  # of the activations; the input is converted to it (IterResNet.to_channels_last)

    def spectral_weights(self) -> tuple:
        """The spectral norm's inputs: conv1 and conv2 stacked ([T, C, C, k, k]) and the BN scales d1, d2 ([T, C])."""
        b = self.blocks
        conv1 = torch.stack([x.conv1.weight for x in b])
        conv2 = torch.stack([x.conv2.weight for x in b])
        return conv1, conv2, stacked_bn_scales([x.bn1 for x in b]), stacked_bn_scales([x.bn2 for x in b])

    def _weights_version(self) -> tuple:
        tensors = [
            t
            for x in self.blocks
            for t in (x.conv1.weight, x.conv2.weight, x.bn1.weight, x.bn2.weight, x.bn1.running_var, x.bn2.running_var)
        ]
        tensors += [self.sn.u1, self.sn.u2]
        return tuple((id(t), t._version) for t in tensors)

    def corrections(self) -> torch.Tensor:
        """c_t = max(L^_t / mu, 1) for every block, [T], without a power step (the vectors do not change).
        Without gradients the result is kept until a weight, BN statistic or power vector changes: evaluation
        asks for it once per block."""
        if not torch.is_grad_enabled() and self._cached is not None and self._cached[0] == self._weights_version():
            return self._cached[1]
        was = self.sn.training
        self.sn.eval()  # no vector update
        try:
            c = self.sn(*self.spectral_weights())
        finally:
            self.sn.train(was)
        if not torch.is_grad_enabled():
            self._cached = (self._weights_version(), c)
        return c

    @torch.no_grad()
    def refresh(self, n_iter: int = 50) -> torch.Tensor:
        """Converges the power vectors on the current weights; returns the bounds L^_t."""
        self._cached = None
        return self.sn.refresh(*self.spectral_weights(), n_iter=n_iter) if self.sn is not None else None

    def corrected_conv2(self) -> Optional[tuple]:
        """Every block's spectrally corrected conv2 kernel conv2_t / c_t (a tuple of T), or None without spectral
        normalization. Training (or with gradients): one power step (in training mode) and one autograd node
        for the stage (StageSpectralNorm.bounded_conv2); evaluation without gradients: the cached corrections."""
        if self.sn is None:
            return None
        if self.training or torch.is_grad_enabled():
            if self.training:
                self._cached = None
            b = self.blocks
            return self.sn.bounded_conv2(
                [x.conv1 for x in b], [x.conv2 for x in b], [x.bn1 for x in b], [x.bn2 for x in b], update=self.training
            )[0].unbind(0)
        c = self.corrections()
        conv2 = torch.stack([b.conv2.weight for b in self.blocks])
        # Every block's conv2 / c_t in one division (the same numbers as T divisions).
        return (conv2 / c.to(conv2.dtype).view(-1, 1, 1, 1, 1)).unbind(0)

    def forward(
        self, x: torch.Tensor, *, stop_after: Optional[int] = None, conv2: Optional[tuple] = None
    ) -> torch.Tensor:
        """The stage's T block updates (the first `stop_after` only, if given). conv2: the blocks' corrected
        kernels from `corrected_conv2()` when the caller computed them already (IterResNet.forward does, for
        all stages first)."""
        kernels = conv2 if conv2 is not None else self.corrected_conv2()
        if self.memory_format is not None:
            # An input in the other layout would meet the blocks' outputs in the residual adds and in ReLU's
            # backward, where ATen's mixed-layout loops are many times slower than its vectorised ones.
            x = to_memory_format(x, self.memory_format)
        z = x
        for t, block in enumerate(self.blocks):
            if stop_after is not None and t >= stop_after:
                break
            r = block.f(z) if kernels is None else block.f_with_conv2(z, kernels[t])
            z = (x if self.pcr else z) + r
        return z


class Transition(nn.Module):
    """Between stages: BN -> ReLU -> conv3x3, stride 2 (w_s -> w_{s+1})."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = _conv3x3(c_in, c_out, stride=2)
        self.nhwc_conv = False  # NCHW input, NHWC convolution (IterResNet.to_channels_last)
        self.fused_bn_relu = True  # BN + ReLU in one kernel (IterResNet.fuse_bn_relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _bn_relu(self.bn, x, self.fused_bn_relu)
        return self.conv(to_memory_format(h, torch.channels_last) if self.nhwc_conv else h)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written while Transition was nn.Sequential(BN, ReLU, conv) name its parts 0 and 2.
        for old, new in (("0.", "bn."), ("2.", "conv.")):
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class IterResNet(nn.Module):
    """The paper's pre-activation ResNet with S stages of T same-shaped blocks (SPEC section 1).

    Args:
        num_classes: K.
        in_channels: 1 (MNIST, Digitclutter) or 3 (CIFAR).
        width: w (stage s has w * 2^s).
        blocks: T per stage.
        stages: S.
        input_size: the input's side (for operator-mode spectral norms).
        pcr: properly convergent updates z_t = x_s + f~_t(z_{t-1}).
        sn_mu: the Lipschitz bound (None: off).
        sn_mode: "operator", "matrix" or "gram".
        init: "nonrecurrent" or "recurrent" (every block of a stage a copy of the first).
        bn_gamma_init: initial BN gamma (the paper's variant: 0.1).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 16,
        blocks: int = 16,
        stages: int = 3,
        input_size: int = 32,
        pcr: bool = False,
        sn_mu: Optional[float] = None,
        sn_mode: str = "operator",
        init: str = "nonrecurrent",
        bn_gamma_init: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("num_classes", num_classes, 1),
            ("in_channels", in_channels, 1),
            ("width", width, 1),
            ("blocks", blocks, 1),
            ("stages", stages, 1),
            ("input_size", input_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"IterResNet: {name} must be an int >= {low}, got {value!r}")
        if init not in INITS:
            raise ValueError(f"IterResNet: init must be one of {INITS}, got {init!r}")
        if sn_mu is not None:
            sn_mu = check_mu(sn_mu)
        if input_size % 2 ** (stages - 1):
            raise ValueError(
                f"IterResNet: input_size {input_size} is not divisible by 2^(stages-1) = {2 ** (stages - 1)}"
            )
        self.config = dict(
            num_classes=num_classes,
            in_channels=in_channels,
            width=width,
            blocks=blocks,
            stages=stages,
            input_size=input_size,
            pcr=pcr,
            sn_mu=sn_mu,
            sn_mode=sn_mode,
            init=init,
            bn_gamma_init=bn_gamma_init,
        )
        self.pcr = pcr
        widths = [width * 2**s for s in range(stages)]
        self.stem = _conv3x3(in_channels, width)
        self.stages = nn.ModuleList(
            Stage(widths[s], blocks, input_size // 2**s, pcr, sn_mu, sn_mode) for s in range(stages)
        )
        self.transitions = nn.ModuleList(Transition(widths[s], widths[s + 1]) for s in range(stages - 1))
        self.head = nn.Sequential(
            nn.BatchNorm2d(widths[-1]), nn.ReLU(), GlobalAvgPool2d(), nn.Flatten(), nn.Linear(widths[-1], num_classes)
        )
        self._initialise(init, bn_gamma_init)

    def _initialise(self, init: str, gamma: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, gamma)
                nn.init.zeros_(m.bias)
        if init == "recurrent":
            with torch.no_grad():
                for stage in self.stages:
                    first = dict(stage.blocks[0].named_parameters())
                    for block in stage.blocks[1:]:
                        for name, p in block.named_parameters():
                            p.copy_(first[name])
        for stage in self.stages:
            if stage.sn is not None:
                stage.refresh(stage.sn.init_iterations)

    def to_channels_last(self, min_width: int = 1, narrow_convolutions: bool = True) -> "IterResNet":
        """Runs every stage at least `min_width` wide channels-last (its kernels stored NHWC, its activations
        NHWC), and the convolutions of the narrower ones NHWC on NCHW activations (`narrow_convolutions`; off:
        those stay NCHW); returns self. The values do not change. On the CPU oneDNN's NHWC convolutions are much
        faster than its NCHW ones, but ATen's channels-last BatchNorm is slow below 16 channels: narrow stages keep
        BatchNorm, ReLU and the residual adds NCHW and convert at each convolution (benchmarks/NOTES.md,
        "Layouts", has the measurements). On CUDA the whole network runs channels-last (min_width=1).

        Every conversion goes through `to_memory_format`, whose gradient comes back in the layout of its input,
        and each stage converts its input to the layout of its activations (Stage.memory_format), so no
        elementwise operation mixes the two layouts (ATen's mixed-layout loops are many times slower)."""
        cl = torch.channels_last
        wide = [self.config["width"] * 2**s >= min_width for s in range(len(self.stages))]
        if wide[0]:
            self.stem.to(memory_format=cl)
        for s, stage in enumerate(self.stages):
            transition = self.transitions[s - 1] if s > 0 else None
            if wide[s]:
                stage.to(memory_format=cl)
                stage.memory_format = cl
            else:
                stage.memory_format = torch.contiguous_format
                if narrow_convolutions:
                    for block in stage.blocks:
                        block.conv1.to(memory_format=cl)
                        block.conv2.to(memory_format=cl)
                        block.nhwc_convs = True
            if transition is not None:  # BN and ReLU in the layout of the stage before, the convolution NHWC
                if wide[s - 1]:
                    transition.to(memory_format=cl)
                elif wide[s] or narrow_convolutions:
                    transition.conv.to(memory_format=cl)
                    transition.nhwc_conv = True
        return self

    def fuse_bn_relu(self, enabled: bool = True) -> "IterResNet":
        """Runs each block's and transition's BatchNorm + ReLU as one kernel (itconv_fast.nn.batch_norm_relu; on
        by default, for CPU tensors: on CUDA cuDNN's BatchNorm serves until the fused kernel is measured there) or,
        with enabled=False, as ATen's two ops, the way a model written in plain PyTorch runs them (the baseline of
        `bench train`); returns self. The values agree to float rounding."""
        for module in self.modules():
            if isinstance(module, (Block, Transition)):
                module.fused_bn_relu = bool(enabled)
        return self

    def coupling_groups(self) -> list[list[nn.Parameter]]:
        """The 6 parameter slots of every stage, as groups for GradientCoupler (BN statistics are never shared)."""
        return groups_from_blocks(*(stage.blocks for stage in self.stages))

    @torch.no_grad()
    def refresh_spectral(self, n_iter: int = 50) -> None:
        """Converges every stage's power vectors on the current weights (e.g. before measuring)."""
        for stage in self.stages:
            stage.refresh(n_iter)

    def stage_input(self, x: torch.Tensor, s: int) -> torch.Tensor:
        """x_s: the input of stage s (stem, earlier stages and transitions)."""
        z = self.stem(x)
        for i in range(s):
            z = self.transitions[i](self.stages[i](z))
        return z

    def after_stage(self, z: torch.Tensor, s: int) -> torch.Tensor:
        """The rest of the network after stage s: transitions, later stages, head."""
        for i in range(s + 1, len(self.stages)):
            z = self.stages[i](self.transitions[i - 1](z))
        return self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The spectral corrections of all stages first, back to back: their small operations then find the
        # kernels, vectors and code still in cache (between stages the activations evict them), and in backward
        # their nodes run last, back to back as well.
        kernels = [stage.corrected_conv2() for stage in self.stages]
        z = self.stem(x)
        for s, stage in enumerate(self.stages):
            if s > 0:
                z = self.transitions[s - 1](z)
            z = stage(z, conv2=kernels[s])
        return self.head(z)


def load_checkpoint(path: str, map_location="cpu") -> IterResNet:
    """The model of a training checkpoint (written by itconv_fast.experiments.training), in eval mode. The file is read
    with weights_only=True (itconv_fast.io.checkpoint): a file that is truncated, not ours or holds foreign
    objects raises CheckpointError (a ValueError) naming it, and never runs code."""
    state = load_checkpoint_state(path, map_location=map_location)
    return model_from_state(state, path if not os.path.isdir(path) else os.path.join(path, "checkpoint.pt"))


def model_from_state(state: dict, where: str) -> nn.Module:
    """The IterResNet (or NamedModel) of a checkpoint already read (load_checkpoint_state), in eval mode; `where`
    names the file in the CheckpointError of a state that does not fit."""
    if not isinstance(state["model_config"], dict):
        raise CheckpointError(f"{where}: not an itconv-fast checkpoint (model_config is not a dict)")
    if "source" in state["model_config"]:  # a model by name (named.py), fine-tuned by `train --model`
        from .named import named_model_from_state

        return named_model_from_state(state, where)
    try:
        model = IterResNet(**state["model_config"])
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{where}: its model does not match an IterResNet ({reason})") from None
    return model.eval()
