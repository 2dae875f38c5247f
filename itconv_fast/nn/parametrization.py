"""Drop-in Lipschitz control for any PyTorch model: spectral normalization of Linear, Conv1d/2d/3d and
ConvTranspose1d/2d/3d layers, per layer or batched over a whole model.

- ``spectral_norm(module, mode=..., mu=...)``: a ``torch.nn.utils.parametrize`` parametrization with the
  habits of ``torch.nn.utils.parametrizations.spectral_norm`` (power vectors ``_u``, ``_v`` as buffers in
  the state dict; one power step per training forward, none in eval; ``remove_parametrizations`` leaves
  the normalised weight), but by default with the layer's *operator* norm: the largest singular value of
  the convolution as a linear map on its input size, stride, dilation, groups and padding included.
  torch's version normalises the kernel reshaped to a matrix, which neither bounds nor equals that.
- ``BatchedSpectralNorm(model, ...)``: the same parametrization on every supported layer, with the power
  steps of layers that share a geometry (kernel shape, stride, padding, input size, ...) run as one
  batched call per group and step instead of one per layer.

Modes (``sigma`` is what the weight is divided by; see ``MODES``):

- "operator": power iteration on the layer's linear map (from below, tight once converged). Input size
  from ``input_size=`` or the first forward. Zero and circular padding; not reflect / replicate (the map
  is then not a convolution and its norm can exceed the kernel's). Linear: the matrix norm.
- "matrix": power iteration on the weight reshaped to [C_out, C_in/groups * prod(kernel)] (torch's
  spectral_norm; ConvTranspose: [C_out/groups, C_in * prod(kernel)], torch's dim=1). Any padding mode.
- "gram": a certified upper bound valid for every input size (Gram iteration, Delattre et al. 2024):
  strides and circular padding can only lower the true norm, dilation and groups are exact
  rewritings. No vectors; costs C^3 k^d per Gram step, so it suits small and medium layers.

Soft by default: W / max(sigma / mu, 1) (rescaled only when sigma > mu, as in invertible ResNets);
``hard=True``: W * mu / sigma. float16 / bfloat16 weights: vectors and iteration in float32.

Split in three files: `geometry` (maps and power steps), this one (the parametrization), `batched`.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..ops import _reference
from .geometry import (
    MODES,
    LayerGeometry,
    check_mode_supports,
    compute_dtype,
    gram_sigmas,
    layer_geometry,
    normalize_rows,
    output_size,
    power_steps,
    sigmas_from_vectors,
    supported_layer,
)
from .rescale import HeldVectorRescale, rescale_weight

__all__ = ["MODES", "SpectralNorm", "spectral_norm", "supported_layer", "layer_geometry"]

_NORM_EPS = _reference._NORM_EPS


# ---------------------------------------------------------------------------------------------------
# The parametrization.


def _check_positive_int(value, what: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"spectral_norm: {what} must be an int >= 1 for {name}, got {value!r}")
    return value


class SpectralNorm(nn.Module):
    """The parametrization that `spectral_norm` registers (see the module docstring for the modes).

    Buffers ``_u`` (output space) and ``_v`` (input space), empty until the input size is known (operator
    mode without input_size: the first forward). A BatchedSpectralNorm may hand it its sigma for the current
    forward (`_batched_sigma`), computed in one call with the rest of its group.
    """

    def __init__(
        self,
        geometry: LayerGeometry,
        *,
        mode: str,
        mu: float,
        hard: bool,
        n_power_iterations: int,
        input_size: Optional[tuple],
        init_iterations: int,
        gram_iterations: int,
        name: str,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.geometry, self.mode, self.mu, self.hard = geometry, mode, mu, hard
        self.n_power_iterations, self.init_iterations, self.gram_iterations = (
            n_power_iterations,
            init_iterations,
            gram_iterations,
        )
        self.layer_name = name
        self.input_size = None
        self._batched_sigma = None  # set by BatchedSpectralNorm for one forward
        self.register_buffer("_u", torch.empty(0, dtype=compute_dtype(dtype), device=device))
        self.register_buffer("_v", torch.empty(0, dtype=compute_dtype(dtype), device=device))
        if mode != "gram":
            if geometry.kind == "linear" or mode == "matrix":
                self._initialise(())
            elif input_size is not None:
                self._initialise(input_size)

    def extra_repr(self) -> str:
        size = f", input_size={self.input_size}" if self.mode == "operator" and self.geometry.kind != "linear" else ""
        return f"mode={self.mode!r}, mu={self.mu}, hard={self.hard}{size}"

    @property
    def needs_input_size(self) -> bool:
        return self.mode == "operator" and self.geometry.kind != "linear"

    @property
    def initialised(self) -> bool:
        return self.mode == "gram" or self._u.numel() > 0

    def _vector_shapes(self, input_size: tuple) -> tuple:
        g = self.geometry
        if self.mode == "matrix" or g.kind == "linear":
            rows = g.weight_shape[1] if g.kind == "conv_transpose" else g.weight_shape[0]
            return (rows,), (math.prod(g.weight_shape) // rows,)
        return (g.out_channels,) + output_size(g, input_size), (g.in_channels,) + tuple(input_size)

    def _initialise(self, input_size: tuple, weight: Optional[torch.Tensor] = None) -> None:
        g = self.geometry
        if self.needs_input_size:
            input_size = tuple(int(s) for s in input_size)
            if len(input_size) != g.nd or any(s < 1 for s in input_size):
                raise ValueError(
                    f"spectral_norm: input_size for {self.layer_name} must be {g.nd} sizes >= 1 "
                    f"(the spatial size of its input), got {input_size!r}"
                )
            try:
                u_shape, v_shape = self._vector_shapes(input_size)
            except RuntimeError as exc:
                raise ValueError(
                    f"spectral_norm: {self.layer_name} cannot take inputs of size {input_size} "
                    f"({str(exc).splitlines()[0]})"
                ) from None
            self.input_size = input_size
        else:
            u_shape, v_shape = self._vector_shapes(())
        dtype, device = self._u.dtype, self._u.device
        # Like torch: random unit vectors, then init_iterations steps when the weight is at hand.
        self._u = normalize_rows(torch.randn((1,) + u_shape, dtype=dtype).to(device))[0]
        self._v = normalize_rows(torch.randn((1,) + v_shape, dtype=dtype).to(device))[0]
        if weight is not None and self.init_iterations:
            with torch.no_grad():
                self.power_step([weight], [self], self.init_iterations)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Vectors of a layer whose input size is still unknown take the saved shapes (the saved v is [C_in, *in]).
        u, v = state_dict.get(prefix + "_u"), state_dict.get(prefix + "_v")
        if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) and self._u.numel() == 0 and u.numel() > 0:
            self._u = torch.empty_like(u, dtype=self._u.dtype, device=self._u.device)
            self._v = torch.empty_like(v, dtype=self._v.dtype, device=self._v.device)
            if self.needs_input_size:
                self.input_size = tuple(v.shape[1:])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def power_step(weights: Sequence[torch.Tensor], params: Sequence["SpectralNorm"], n_iter: int):
        """n_iter power steps on B layers of one geometry in one batched call; updates their _u and _v.
        Returns (sigma [B], u [B, ...], v [B, ...]) without gradient: this step's vectors, fresh tensors that
        later steps do not touch (the backward pass of this forward needs them)."""
        p0 = params[0]
        u = torch.stack([p._u for p in params])
        v, sigma = power_steps(p0.geometry, p0.mode, weights, u, p0.input_size, n_iter)
        with torch.no_grad():
            torch._foreach_copy_([p._u for p in params], list(u.unbind(0)))
            torch._foreach_copy_([p._v for p in params], [x.reshape(p._v.shape) for x, p in zip(v.unbind(0), params)])
        return sigma, u, v.reshape((len(params),) + tuple(p0._v.shape))

    @staticmethod
    def sigmas(weights: Sequence[torch.Tensor], params: Sequence["SpectralNorm"]):
        """(sigma [B], u, v) from the stored vectors, no power step and no gradient; gram: (bound [B] with
        autograd, None, None)."""
        p0 = params[0]
        if p0.mode == "gram":
            return (
                gram_sigmas(p0.geometry, [w.to(compute_dtype(w.dtype)) for w in weights], p0.gram_iterations),
                None,
                None,
            )
        u = torch.stack([p._u for p in params])
        v = torch.stack([p._v for p in params])
        with torch.no_grad():
            return sigmas_from_vectors(p0.geometry, p0.mode, weights, u, v), u, v

    def _sync_dtype(self, weight: torch.Tensor) -> None:
        # model.half() turns floating buffers into float16: the iteration stays in float32 regardless.
        dtype = compute_dtype(weight.dtype)
        if self._u.dtype != dtype:
            self._u, self._v = self._u.to(dtype), self._v.to(dtype)

    def normalised(
        self, weight: torch.Tensor, sigma: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The weight divided by its correction; sigma's gradient is the one with u, v held constant."""
        if self.mode == "gram":
            return rescale_weight(weight, sigma, self.mu, self.hard)
        return HeldVectorRescale.apply(weight, sigma, u, v, self)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        pending, self._batched_sigma = self._batched_sigma, None
        if pending is not None:
            return self.normalised(weight, *pending)
        if not self.initialised:
            raise RuntimeError(
                f"spectral_norm: the input size of {self.layer_name} is not known yet; run one forward "
                f"pass or pass input_size="
            )
        if self.mode != "gram":
            self._sync_dtype(weight)
        if self.training and self.mode != "gram":
            sigma, u, v = self.power_step([weight], [self], self.n_power_iterations)
        else:
            sigma, u, v = self.sigmas([weight], [self])
        return self.normalised(weight, sigma[0], None if u is None else u[0], None if v is None else v[0])

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        # Like torch's: assigning a weight stores it as given (it is normalised on the next read).
        return value


def _input_size_hook(param: SpectralNorm):
    nd = param.geometry.nd

    def hook(module, args):
        if spectral_parametrization(module) is not param or not args or not isinstance(args[0], torch.Tensor):
            return
        size = tuple(args[0].shape[-nd:])
        if param.input_size is None:
            param._initialise(size, parametrize_original(module))
        elif size != param.input_size:
            warnings.warn(
                f"spectral_norm: {param.layer_name} now sees inputs of size {size}; its operator norm is "
                f"measured on {param.input_size}",
                RuntimeWarning,
                stacklevel=2,
            )

    return hook


def parametrize_original(module: nn.Module) -> torch.Tensor:
    return module.parametrizations["weight"].original


def spectral_norm(
    module: nn.Module,
    *,
    mode: str = "operator",
    mu: float = 1.0,
    input_size: Optional[Sequence[int]] = None,
    n_power_iterations: int = 1,
    hard: bool = False,
    init_iterations: int = 15,
    gram_iterations: int = 4,
    name: Optional[str] = None,
) -> nn.Module:
    """Registers a spectral-norm parametrization on ``module.weight`` and returns the module.

    Args:
        module: nn.Linear, nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d.
        mode: "operator" (the layer's norm on its input size; default), "matrix" (torch's reshaped kernel)
            or "gram" (certified bound for every input size). See the module docstring.
        mu: the bound (> 0). hard: always divide by sigma / mu (default: only when sigma > mu).
        input_size: the spatial size of the layer's input (operator mode); None: from the first forward.
        n_power_iterations: power steps per training forward. init_iterations: steps when the vectors are
            created (torch uses 15). gram_iterations: Gram steps (mode "gram").
        name: how errors and reports call the layer (default: its class name).
    """
    name = name or type(module).__name__
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu <= 0:
        raise ValueError(f"spectral_norm: mu must be a finite number > 0 for {name}, got {mu!r}")
    if not isinstance(hard, bool):
        raise ValueError(f"spectral_norm: hard must be True or False for {name}, got {hard!r}")
    geometry = layer_geometry(module, name)
    check_mode_supports(geometry, mode, name)
    _check_positive_int(n_power_iterations, "n_power_iterations", name)
    _check_positive_int(gram_iterations, "gram_iterations", name)
    if isinstance(init_iterations, bool) or not isinstance(init_iterations, int) or init_iterations < 0:
        raise ValueError(f"spectral_norm: init_iterations must be an int >= 0 for {name}, got {init_iterations!r}")
    if parametrize.is_parametrized(module, "weight"):
        raise ValueError(f"spectral_norm: {name}.weight is already parametrized; remove that first")
    weight = module.weight
    if not weight.is_floating_point():
        raise TypeError(f"spectral_norm: {name}.weight must be floating point, got {weight.dtype}")
    param = SpectralNorm(
        geometry,
        mode=mode,
        mu=float(mu),
        hard=hard,
        n_power_iterations=n_power_iterations,
        input_size=None,
        init_iterations=init_iterations,
        gram_iterations=gram_iterations,
        name=name,
        dtype=weight.dtype,
        device=weight.device,
    )
    if param.needs_input_size and input_size is not None:
        param._initialise(tuple(input_size), weight)
    elif mode != "gram" and not param.needs_input_size and init_iterations:
        with torch.no_grad():
            param.power_step([weight], [param], init_iterations)
    # unsafe: skips torch's trial call (which would need the input size; the parametrization keeps shape
    # and dtype by construction).
    parametrize.register_parametrization(module, "weight", param, unsafe=True)
    if param.needs_input_size:
        module._itconv_sn_hook = module.register_forward_pre_hook(_input_size_hook(param))
    return module


@torch.no_grad()
def converge_power_vectors(model: nn.Module, steps: int = 50) -> int:
    """Runs `steps` power steps on every spectral_norm layer of `model` (operator and matrix modes) on its current
    weight, so that each layer's bound holds again where its power vector lags a weight that moved fast (the
    training forward takes n_power_iterations steps; lipschitz_report flags a lagging one). Gram mode needs none:
    its bound always holds. Returns the number of layers stepped."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"converge_power_vectors: steps must be an int >= 1, got {steps!r}")
    stepped = 0
    for module in model.modules():
        param = spectral_parametrization(module)
        if param is None or param.mode == "gram" or not param.initialised:
            continue
        weight = module.parametrizations["weight"].original
        param._sync_dtype(weight)
        SpectralNorm.power_step([weight], [param], steps)
        stepped += 1
    return stepped


def spectral_parametrization(module: nn.Module) -> Optional[SpectralNorm]:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    found = [p for p in module.parametrizations["weight"] if isinstance(p, SpectralNorm)]
    return found[0] if found else None
