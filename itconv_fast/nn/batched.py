"""`BatchedSpectralNorm`: `spectral_norm` on every supported layer of a model, with the power steps of layers
that share a geometry (kernel shape, stride, padding, input size, ...) run as one batched call per group and
step instead of one per layer.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from .geometry import check_mode_supports, layer_geometry, supported_layer
from .parametrization import SpectralNorm, parametrize_original, spectral_norm, spectral_parametrization

__all__ = ["BatchedSpectralNorm"]


# ---------------------------------------------------------------------------------------------------
# Batched over a model.


class BatchedSpectralNorm:
    """Spectral normalization of every supported layer of `model`, power steps batched per geometry group.

    Registers `spectral_norm` on every nn.Linear / ConvNd / ConvTransposeNd selected by `include` (None:
    all; a callable (qualified_name, module) -> bool; or a collection of qualified names), and a forward
    pre-hook on `model` that, per group of layers with the same geometry, dtype, device and input size,
    runs one batched call (power steps in training, sigma from the stored vectors in eval) and hands each
    layer its sigma. Results equal applying `spectral_norm` to each layer (to float rounding); the state
    lives in the layers' parametrizations (the model's state_dict). Layers whose input size is still
    unknown (operator mode, no input_size) run on their own in the first forward; the groups form after it.

    Args: as `spectral_norm`; input_sizes: {qualified_name: size} for operator mode, or pass
    `example_input` to run one forward (in eval, no gradient) that records every layer's size.
    `remove()` takes the hook and the parametrizations away, leaving the normalised weights.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mu: float = 1.0,
        mode: str = "operator",
        include: Union[None, Callable[[str, nn.Module], bool], Iterable[str]] = None,
        n_power_iterations: int = 1,
        hard: bool = False,
        init_iterations: int = 15,
        gram_iterations: int = 4,
        input_sizes: Optional[dict] = None,
        example_input=None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"BatchedSpectralNorm: model must be an nn.Module, got {type(model).__name__}")
        selected = self._select(model, include)
        tied = self._tied(model, selected, include)
        selected = [(n, m) for n, m in selected if n not in tied]
        if not selected:
            raise ValueError(
                "BatchedSpectralNorm: the model has no supported layer (nn.Linear, ConvNd, "
                "ConvTransposeNd) selected by include"
            )
        input_sizes = dict(input_sizes or {})
        unknown = set(input_sizes) - {n for n, _ in selected}
        if unknown:
            raise ValueError(f"BatchedSpectralNorm: input_sizes names layers that are not selected: {sorted(unknown)}")
        # Check every layer before changing any.
        for qualified, module in selected:
            geometry = layer_geometry(module, qualified)
            check_mode_supports(geometry, mode, qualified)
            if parametrize.is_parametrized(module, "weight"):
                raise ValueError(f"BatchedSpectralNorm: {qualified}.weight is already parametrized")
        self.model, self.mode = model, mode
        # Never silent: what has a weight matrix but is not normalised is listed, and named once in a warning.
        unsupported = self.unsupported_weights(model)
        self.skipped = unsupported + list(tied)
        if self.skipped:
            warnings.warn(_skipped_message(unsupported, tied), RuntimeWarning, stacklevel=2)
        self.layers: list[tuple[str, nn.Module]] = []
        for qualified, module in selected:
            spectral_norm(
                module,
                mode=mode,
                mu=mu,
                input_size=input_sizes.get(qualified),
                n_power_iterations=n_power_iterations,
                hard=hard,
                init_iterations=init_iterations,
                gram_iterations=gram_iterations,
                name=qualified,
            )
            self.layers.append((qualified, module))
        self.n_power_iterations = n_power_iterations
        self._groups: Optional[list[list[tuple[nn.Module, SpectralNorm]]]] = None
        self._hook = model.register_forward_pre_hook(self._pre_forward)
        self._post_hook = model.register_forward_hook(self._post_forward)
        if example_input is not None:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                model(example_input)
            model.train(was_training)

    @staticmethod
    def _tied(model, selected, include) -> dict:
        """{qualified name: the other owners of its weight} for the selected layers whose weight is also another
        module's parameter (GPT-2's lm_head and its token embedding): normalising one would silently untie the
        two, so a model-wide call skips them (listed in `skipped`, named in the warning). Raises ValueError, before
        anything changes, for one that `include` names."""
        owners: dict = {}
        for name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
        tied = {}
        for qualified, module in selected:
            others = [o for o in owners.get(id(module.weight), []) if o != f"{qualified}.weight"]
            if others:
                tied[qualified] = others
        named = set() if include is None or callable(include) else set(include)
        for qualified, others in tied.items():
            if qualified in named:  # asked for by name: refused, not skipped
                raise ValueError(
                    f"BatchedSpectralNorm: {qualified}.weight is tied to {', '.join(others)}; normalising "
                    f"{qualified} would untie them. Leave it out of include or untie the weights first"
                )
        return tied

    @staticmethod
    def unsupported_weights(model: nn.Module) -> list:
        """Qualified names of the modules with a matrix-shaped (2-D or larger) weight that spectral_norm does not
        support (an Embedding, a custom layer): what a model-wide normalisation leaves out."""
        return [
            n
            for n, m in model.named_modules()
            if not supported_layer(m) and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2
        ]

    @staticmethod
    def _select(model, include):
        layers = [(n, m) for n, m in model.named_modules() if supported_layer(m)]
        if include is None:
            return layers
        if callable(include):
            return [(n, m) for n, m in layers if include(n, m)]
        names = set(include)
        missing = names - {n for n, _ in layers}
        if missing:
            raise ValueError(f"BatchedSpectralNorm: include names no supported layer: {sorted(missing)}")
        return [(n, m) for n, m in layers if n in names]

    @property
    def groups(self) -> list[list[str]]:
        """The layers' qualified names, grouped as the batched calls run them (empty before sizes are known)."""
        names = {id(m): n for n, m in self.layers}
        return [[names[id(m)] for m, _ in group] for group in (self._build_groups() or [])]

    def _build_groups(self):
        if self._groups is None:
            params = [(m, spectral_parametrization(m)) for _, m in self.layers]
            if any(p is None or not p.initialised for _, p in params):
                return None
            keyed: dict = {}
            for m, p in params:
                w = parametrize_original(m)
                key = (p.geometry, p.mode, p.input_size, w.dtype, w.device, p.n_power_iterations, p.gram_iterations)
                keyed.setdefault(key, []).append((m, p))
            self._groups = list(keyed.values())
        return self._groups

    def _pre_forward(self, model, args):
        groups = self._build_groups()
        if groups is None:  # operator-mode sizes are learnt in this forward, layer by layer
            return
        for group in groups:
            modules, params = zip(*group)
            weights = [parametrize_original(m) for m in modules]
            if params[0].mode != "gram":
                for p, w in zip(params, weights):
                    p._sync_dtype(w)
            if params[0].training and params[0].mode != "gram":
                sigma, u, v = SpectralNorm.power_step(weights, params, self.n_power_iterations)
            else:
                sigma, u, v = SpectralNorm.sigmas(weights, params)
            for b, p in enumerate(params):
                p._batched_sigma = (sigma[b], None if u is None else u[b], None if v is None else v[b])

    def _post_forward(self, model, args, output):
        # A layer the forward did not use must not keep this forward's sigma for a later read of its weight.
        for _, m in self.layers:
            spectral_parametrization(m)._batched_sigma = None

    def step(self) -> None:
        """Runs the batched update without a forward (e.g. to converge the vectors before evaluation)."""
        with torch.no_grad():
            self._pre_forward(self.model, ())
        for _, m in self.layers:
            spectral_parametrization(m)._batched_sigma = None

    def remove(self) -> None:
        """Removes the hook and the parametrizations; the layers keep their normalised weights."""
        self._hook.remove()
        self._post_hook.remove()
        for _, m in self.layers:
            hook = getattr(m, "_itconv_sn_hook", None)
            if hook is not None:
                hook.remove()
                del m._itconv_sn_hook
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        self.layers = []
        self._groups = None


def _skipped_message(unsupported: list, tied: dict) -> str:
    """The one warning naming every module with a weight matrix that is not normalised, and why."""
    reasons = []
    if unsupported:
        reasons.append(f"not a supported layer type: {', '.join(unsupported)}")
    if tied:
        owners = ", ".join(f"{q} (tied to {', '.join(o)})" for q, o in tied.items())
        reasons.append(f"weight tied to another module's, which normalising would untie: {owners}")
    count = len(unsupported) + len(tied)
    return f"BatchedSpectralNorm: {count} module(s) with a weight matrix are not normalised ({'; '.join(reasons)})"
