"""Per-layer Lipschitz constants of any model, by every estimator, batched over same-geometry layers.

`lipschitz_report(model, example_input)` runs one forward (eval, no gradient) to learn each layer's input
size, then for every nn.Linear / ConvNd / ConvTransposeNd (and eval-mode BatchNorm, a diagonal map):

- matrix: the exact largest singular value of the reshaped kernel (torch's spectral_norm's quantity);
- operator: power iteration on the layer's linear map at its input size (a lower bound that converges to
  the true norm; stride, dilation, groups, zero / circular padding included);
- gram: the certified Gram-iteration upper bound, valid for every input size;
- exact: for circular, stride-1, same-size convolutions, the largest singular value of the per-frequency
  channel matrices of the kernel's DFT (Sedghi, Gupta & Long 2019): the true norm, in closed form.

and the products of the per-layer values: the Lipschitz bound of a plain chain of these layers with
1-Lipschitz activations. It is not a bound for residual connections (a block contributes 1 + L there).
Layers that carry a spectral_norm parametrization are measured with their normalised weight.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from ..nn.geometry import (
    LayerGeometry,
    as_matrix,
    compute_dtype,
    dilate_kernel,
    gram_sigmas,
    layer_geometry,
    normalize_rows,
    output_size,
    power_steps,
    supported_layer,
    transposed_linear,
)
from ..nn.parametrization import spectral_parametrization

__all__ = ["LayerLipschitz", "LipschitzReport", "lipschitz_report", "circular_exact_sigmas"]


@dataclass
class LayerLipschitz:
    name: str
    layer: str  # the module's class name
    input_size: Optional[tuple]
    matrix: Optional[float]
    operator: Optional[float]
    gram: Optional[float]
    exact: Optional[float] = None
    note: str = ""
    bound: Optional[float] = None  # a spectral_norm layer's mu: the norm its normalised weight should not exceed
    bound_held: Optional[bool] = None  # whether the measured norm is within it (False: the power vector lags)

    @property
    def bound_measured(self) -> Optional[float]:
        """The norm the bound is checked against: the exact one where known, else the operator norm (a converged
        lower bound of the true norm: above mu, the bound certainly fails), else the matrix norm."""
        for value in (self.exact, self.operator, self.matrix):
            if value is not None:
                return value
        return None


@dataclass
class LipschitzReport:
    layers: list[LayerLipschitz] = field(default_factory=list)
    power_iterations: int = 0
    gram_iterations: int = 0

    def _product(self, attr: str) -> float:
        values = [getattr(r, attr) if getattr(r, attr) is not None else r.exact for r in self.layers]
        if any(v is None for v in values):
            return float("nan")
        return math.prod(values)

    @property
    def product_operator(self) -> float:
        """The product of the operator-norm estimates (exact values where known)."""
        return self._product("operator")

    @property
    def product_gram(self) -> float:
        """The product of the certified bounds: an upper bound for a plain chain of these layers."""
        return self._product("gram")

    @property
    def product_matrix(self) -> float:
        return self._product("matrix")

    def rows(self) -> list[list[str]]:
        def f(x):  # None: not measured; a product with a layer not measured is NaN
            return "-" if x is None or math.isnan(x) else f"{x:.4g}"

        header = ["layer", "type", "input", "matrix", "operator", "gram bound", "exact (FFT)"]
        body = [
            [
                r.name,
                r.layer,
                "x".join(map(str, r.input_size)) if r.input_size else "-",
                f(r.matrix),
                f(r.operator),
                f(r.gram),
                f(r.exact),
            ]
            for r in self.layers
        ]
        body.append(["product", "", "", f(self.product_matrix), f(self.product_operator), f(self.product_gram), ""])
        return [header] + body

    def table(self) -> str:
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings()])

    def to_markdown(self) -> str:
        rows = self.rows()
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(out + [f"\n**Warning:** {w}" for w in self.warnings()])

    def to_dict(self) -> dict:
        return {
            "layers": [asdict(r) for r in self.layers],
            "product_matrix": self.product_matrix,
            "product_operator": self.product_operator,
            "product_gram": self.product_gram,
            "power_iterations": self.power_iterations,
            "gram_iterations": self.gram_iterations,
            "unheld_bounds": [r.name for r in self.unheld_bounds],
        }

    @property
    def unheld_bounds(self) -> list[LayerLipschitz]:
        """The spectrally normalised layers whose normalised weight exceeds its bound mu (by more than 0.1%): their
        power vector has not converged to the weight (e.g. it lags a weight that moves fast under SGD)."""
        return [r for r in self.layers if r.bound_held is False]

    def warnings(self) -> list[str]:
        return [
            f"{r.name}: norm {r.bound_measured:.4g} exceeds its spectral-norm bound mu = {r.bound:g}: the power vector "
            "has not converged (itconv_fast.nn.converge_power_vectors(model) steps it to the weight; "
            "n_power_iterations=N takes more steps each training forward; mode='gram' bounds always hold)"
            for r in self.unheld_bounds
        ]

    def __str__(self) -> str:
        return self.table()


def _circular_exact_ok(g: LayerGeometry, input_size: tuple) -> bool:
    return (
        g.kind == "conv"
        and g.padding_mode == "circular"
        and all(s == 1 for s in g.stride)
        and all(
            g.pads[2 * i] + g.pads[2 * i + 1] == d * (k - 1)
            for i, (d, k) in enumerate(zip(reversed(g.dilation), reversed(g.kernel_size)))
        )
    )


def circular_exact_sigmas(geometry: LayerGeometry, weights: list[torch.Tensor], input_size: tuple) -> torch.Tensor:
    """The exact norms of B circular, stride-1, same-size convolutions on `input_size` [B]: the largest singular
    value over frequencies of the kernel's DFT (channel matrices [C_out, C_in] per frequency). A circular
    shift of the kernel (where the padding puts its centre) only multiplies each matrix by a phase."""
    nd, groups = geometry.nd, geometry.groups
    kernels = []
    for w in weights:
        w = dilate_kernel(w.detach().to(compute_dtype(w.dtype)), geometry.dilation)
        c_out, c_in_g = w.shape[:2]
        # Groups: the block-diagonal dense kernel.
        dense = w.new_zeros((c_out, c_in_g * groups) + tuple(w.shape[2:]))
        step = c_out // groups
        for j in range(groups):
            dense[j * step : (j + 1) * step, j * c_in_g : (j + 1) * c_in_g] = w[j * step : (j + 1) * step]
        # Taps beyond the input size wrap around (fftn's s= would truncate them).
        for i, n in enumerate(input_size):
            dim, k = 2 + i, dense.shape[2 + i]
            if k > n:
                folded = dense.new_zeros(dense.shape[:dim] + (n,) + dense.shape[dim + 1 :])
                for start in range(0, k, n):
                    part = dense.narrow(dim, start, min(n, k - start))
                    folded.narrow(dim, 0, part.shape[dim]).add_(part)
                dense = folded
        kernels.append(dense)
    k = torch.stack(kernels)  # [B, C_out, C_in, *k]
    spectrum = torch.fft.fftn(k, s=tuple(input_size), dim=tuple(range(3, 3 + nd)))
    mats = spectrum.flatten(3).permute(0, 3, 1, 2)  # [B, F, C_out, C_in]
    return torch.linalg.matrix_norm(mats, ord=2).amax(dim=1)


def _record_input_sizes(model: nn.Module, example_input) -> dict:
    sizes, handles = {}, []
    for name, module in model.named_modules():
        if supported_layer(module) and not (isinstance(module, nn.Linear) or transposed_linear(module)):
            nd = len(module.kernel_size)  # a convolution: its input's spatial size decides its operator norm

            def hook(mod, args, name=name, nd=nd):
                if args and isinstance(args[0], torch.Tensor):
                    sizes.setdefault(name, tuple(args[0].shape[-nd:]))

            handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sizes


def lipschitz_report(
    model: nn.Module,
    example_input,
    *,
    power_iterations: int = 100,
    gram_iterations: int = 4,
    gram: bool = True,
    seed: int = 0,
) -> LipschitzReport:
    """Per-layer sigma by every estimator (see the module docstring), batched per geometry group.

    Args:
        model: any nn.Module. example_input: a tensor (or a tuple of positional arguments) for one forward.
        power_iterations: operator-mode steps from a random start (100 converge typical layers to 1e-4).
        gram_iterations: Gram steps for the certified bound; gram=False skips it (it costs C^3 k^d per step).
    Layers that the forward does not reach are reported without an operator value.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lipschitz_report: model must be an nn.Module, got {type(model).__name__}")
    for what, value in (("power_iterations", power_iterations), ("gram_iterations", gram_iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"lipschitz_report: {what} must be an int >= 1, got {value!r}")
    sizes = _record_input_sizes(model, example_input)
    generator = torch.Generator().manual_seed(seed)
    rows: dict[str, LayerLipschitz] = {}
    groups: dict = {}
    bound_modes: dict = {}  # spectral_norm layers: name -> mode
    order = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.track_running_stats
            and module.running_var is not None
        ):
            scale = module.running_var.add(module.eps).rsqrt()
            if module.weight is not None:
                scale = scale * module.weight.detach()
            value = scale.abs().max().item()
            rows[name] = LayerLipschitz(
                name, type(module).__name__, None, value, value, value, value, "eval-mode scale"
            )
            order.append(name)
            continue
        if not supported_layer(module):
            continue
        g = layer_geometry(module, name)
        weight = module.weight.detach()  # the normalised weight of a parametrized layer
        size = sizes.get(name)
        order.append(name)
        rows[name] = LayerLipschitz(name, type(module).__name__.replace("Parametrized", ""), size, None, None, None)
        normalised = spectral_parametrization(module)
        if normalised is not None:
            rows[name].bound = normalised.mu
            bound_modes[name] = normalised.mode
        groups.setdefault((g, size, weight.dtype, weight.device), []).append((name, weight))
    with torch.no_grad():
        for (g, size, dtype, device), members in groups.items():
            names = [n for n, _ in members]
            weights = [w.to(compute_dtype(dtype)) for _, w in members]
            mats = torch.stack([as_matrix(g, w) for w in weights])
            for n, s in zip(names, torch.linalg.matrix_norm(mats, ord=2).tolist()):
                rows[n].matrix = s
            if g.kind == "linear" or size is not None:
                if g.kind == "linear":  # the matrix norm is exact; a power iteration would only approach it
                    values = [rows[n].matrix for n in names]
                else:
                    u_shape = (g.out_channels,) + output_size(g, size)
                    u0 = torch.randn((len(weights),) + u_shape, generator=generator, dtype=weights[0].dtype)
                    u = normalize_rows(u0.to(device))
                    _, sigma = power_steps(g, "operator", weights, u, size, power_iterations)
                    values = sigma.tolist()
                for n, s in zip(names, values):
                    rows[n].operator = s
            elif g.kind != "linear":
                for n in names:
                    rows[n].note = "not reached by the forward"
            if gram and g.padding_mode in ("zeros", "circular"):
                for n, s in zip(names, gram_sigmas(g, weights, gram_iterations).tolist()):
                    rows[n].gram = s
            if size is not None and _circular_exact_ok(g, size):
                for n, s in zip(names, circular_exact_sigmas(g, weights, size).tolist()):
                    rows[n].exact = s
    _check_bounds(rows, bound_modes)
    return LipschitzReport([rows[n] for n in order], power_iterations, gram_iterations if gram else 0)


_BOUND_TOLERANCE = 1e-3  # a converged power vector holds the bound to float rounding; 0.1% is well above it


def _check_bounds(rows: dict, bound_modes: dict) -> None:
    """Sets bound_held on the rows of the spectrally normalised layers ({name: mode})."""
    for name, mode in bound_modes.items():
        row = rows[name]
        # matrix mode bounds the matrix norm (the operator norm may exceed it); the others the operator norm
        measured = row.matrix if mode == "matrix" else row.bound_measured
        if measured is not None:
            row.bound_held = measured <= row.bound * (1 + _BOUND_TOLERANCE)
