"""Any residual stack: the protocol, ResidualStack, the nn.TransformerEncoder adapter, and the indices, the
analysis and the coupler on them."""

import copy

import pytest
import torch
from torch import nn

from itconv_fast import GradientCoupler
from itconv_fast.measures.analysis import analyze
from itconv_fast.measures.indices import compute_indices
from itconv_fast.models.residual import (
    ResidualStack,
    check_residual_model,
    sequence_error,
    sequence_loss,
    transformer_encoder_adapter,
)

D, L, C = 16, 5, 4


class TinyViT(nn.Module):
    """Token embedding, a TransformerEncoder, a class token read out by a linear head."""

    def __init__(self, layers=3, norm_first=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(3, D)
        self.cls = nn.Parameter(torch.randn(1, 1, D) * 0.1)
        layer = nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(D), enable_nested_tensor=False)
        self.out = nn.Linear(D, C)

    def stem(self, x):
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)

    def forward(self, x):
        return self.out(self.encoder(self.stem(x))[:, 0])


class _Stem(nn.Module):
    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.stem(x)


class _ClsHead(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, z):
        return self.out(z[:, 0])


def adapted(vit):
    return transformer_encoder_adapter(vit.encoder, _Stem(vit), _ClsHead(vit.out))


def data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, 3, generator=g), torch.randint(0, C, (n,), generator=g)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_adapter_gives_the_modules_own_logits(norm_first):
    vit = TinyViT(norm_first=norm_first).eval()
    x, _ = data()
    with torch.no_grad():
        assert torch.allclose(adapted(vit)(x), vit(x), atol=1e-5)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
def test_indices_agree_between_cached_and_reference_evaluators(norm_first):
    vit = TinyViT(norm_first=norm_first).eval()
    model = adapted(vit)
    x, y = data()
    with torch.no_grad():
        y = vit(x).argmax(1)
    y[:16] = (y[:16] + 1) % C
    cached = compute_indices(model, (x, y), extra_iterations=3, method="cached", batch_size=32)
    reference = compute_indices(model, (x, y), extra_iterations=3, method="reference", batch_size=32)
    for a, b in zip(cached.stages, reference.stages):
        assert a.e_conv == b.e_conv and a.e_drop == b.e_drop and a.e_div == b.e_div
    assert cached.error == pytest.approx(0.25, abs=0.05) and cached.chance_error == pytest.approx(1 - 1 / C)
    full = analyze(model, (x, y), extra_iterations=3)
    assert len(full.stages[0].refinement) == 3 and len(full.stages[0].anytime_error) == 3 + 3


def test_lam_one_coupling_keeps_transformer_layers_identical():
    vit = TinyViT()
    first = vit.encoder.layers[0].state_dict()
    for layer in vit.encoder.layers[1:]:
        layer.load_state_dict(first)  # recurrent initialisation
    model = adapted(vit)
    coupler = GradientCoupler(model, lam=1.0)
    opt = torch.optim.SGD(vit.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    x, y = data()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        coupler()
        opt.step()
    layers = vit.encoder.layers
    for name, p in layers[0].named_parameters():
        for other in layers[1:]:
            assert torch.equal(dict(other.named_parameters())[name], p), name
    assert not torch.equal(layers[0].linear1.weight, TinyViT().encoder.layers[0].linear1.weight)  # it did train


def test_residual_stack_of_plain_blocks_and_from_layers():
    torch.manual_seed(0)
    fs = [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(3)]
    stack = ResidualStack(nn.Linear(3, D), [fs[:2], fs[2:]], nn.Linear(D, C), transitions=[nn.Linear(D, D)])
    x = torch.randn(8, 3)
    with torch.no_grad():
        z = stack.stem(x)
        z = z + fs[0](z)
        z = z + fs[1](z)
        z = stack.transitions[0](z)
        z = z + fs[2](z)
        assert torch.allclose(stack(x), stack.head(z))
    layers = [nn.Linear(D, D) for _ in range(2)]  # a layer computing the whole update
    from_layers = ResidualStack.from_layers(nn.Linear(3, D), [layers], nn.Linear(D, C))
    with torch.no_grad():
        z = from_layers.stem(x)
        assert torch.allclose(from_layers.stages[0].blocks[0].residual(z), layers[0](z) - z)
        assert torch.allclose(from_layers(x), from_layers.head(layers[1](layers[0](z))), atol=1e-6)
    assert len(stack.coupling_groups()) == 2 * 2  # weight and bias of the Linear in each stage


def test_models_missing_a_part_get_the_named_error():
    class NoStem(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(2, 2)
            self.stages = []

    with pytest.raises(TypeError, match="`stem`"):
        compute_indices(NoStem(), (torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)))
    vit = TinyViT()
    model = adapted(vit)
    broken = copy.deepcopy(model)
    del broken.stages[0].pcr
    with pytest.raises(TypeError, match="stage 0 has no boolean `pcr`"):
        analyze(broken, data())
    broken = copy.deepcopy(model)
    broken.transitions.append(nn.Identity())
    with pytest.raises(TypeError, match="transitions"):
        check_residual_model(broken)
    with pytest.raises(TypeError, match="no coupling_groups"):
        GradientCoupler(nn.Linear(2, 2), lam=0.5)
    with pytest.raises(TypeError, match="TransformerEncoder"):
        transformer_encoder_adapter(nn.Linear(2, 2), nn.Identity(), nn.Identity())


def test_sequence_scoring_per_token_reduced_per_example():
    logits = torch.zeros(2, 4, 3)
    logits[..., 0] = 1.0  # predicts class 0 everywhere
    targets = torch.tensor([[0, 0, 1, 2], [0, 0, 0, 0]])
    assert sequence_error(logits, targets).tolist() == [0.5, 0.0]
    assert sequence_error(logits, torch.tensor([[0, -1, 1, -1], [0, 0, 0, 0]]), ignore_index=-1).tolist() == [0.5, 0.0]
    per_token = nn.functional.cross_entropy(logits.reshape(-1, 3), targets.reshape(-1), reduction="none").view(2, 4)
    assert torch.allclose(sequence_loss(logits, targets), per_token.mean(1))


def test_indices_of_a_sequence_model_count_token_errors():
    torch.manual_seed(0)
    stack = ResidualStack(
        nn.Linear(3, D), [[nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(3)]], nn.Linear(D, C)
    ).eval()  # per-token outputs [N, L, C]
    x = torch.randn(40, L, 3)
    with torch.no_grad():
        y = stack(x).argmax(-1)
    y[:, 0] = (y[:, 0] + 1) % C  # one wrong token in five
    report = compute_indices(stack, (x, y), extra_iterations=2, error_fn=sequence_error, chance_error=1 - 1 / C)
    assert report.error == pytest.approx(0.2)
    full = analyze(
        stack, (x, y), extra_iterations=2, error_fn=sequence_error, loss_fn=sequence_loss, chance_error=1 - 1 / C
    )
    assert full.indices.to_dict() == report.to_dict()
