"""The models people use (torchvision, timm, Hugging Face transformers), with random weights: the adapters reproduce
each model's own outputs and work with compute_indices, analyze, GradientCoupler and the objectives;
BatchedSpectralNorm normalises transformers' Conv1D, lists what it cannot normalise, skips tied weights and refuses
them by name."""

import copy
import warnings

import pytest
import torch

from itconv_fast import GradientCoupler, analyze, compute_indices
from itconv_fast.models.integrations import residual_model
from itconv_fast.models.residual import sequence_error
from itconv_fast.nn import BatchedSpectralNorm, spectral_norm
from itconv_fast.objectives import FixedPointResidual, ObjectiveContext, record_stages


def _torchvision(arch):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(num_classes=5), torch.randn(4, 3, 48, 48), torch.randint(0, 5, (4,))


def _vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=5, depth=4
    )
    return model, torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))


def _timm_resnet():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=5), torch.randn(4, 3, 48, 48), torch.randint(0, 5, (4,))


def _gpt2(layers=3):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=layers, n_embd=32, n_head=4, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    ids = torch.randint(0, 40, (3, 8))
    return transformers.GPT2LMHeadModel(config), ids, torch.randint(0, 40, (3, 8))


def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=3,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=40,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(config), torch.randint(0, 40, (3, 8)), torch.randint(0, 40, (3, 8))


MODELS = {
    "resnet18": lambda: _torchvision("resnet18"),
    "resnet50": lambda: _torchvision("resnet50"),
    "timm-resnet18": _timm_resnet,
    "vit": _vit,
    "gpt2": _gpt2,
    "llama": _llama,
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _error_fn(kind):
    return sequence_error if kind in ("gpt2", "llama") else None


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_adapter_reproduces_the_models_outputs(kind):
    model, x, _ = MODELS[kind]()
    model.eval()
    stack = residual_model(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(stack(x), _logits(model(x)), rtol=1e-5, atol=1e-5)
    # The stack holds the model's own modules: a change to the model shows in the stack.
    first_block = stack.stages[-1].blocks[0].f
    assert any(p is q for p in first_block.parameters() for q in model.parameters())


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_indices_cached_equals_reference_on_real_models(kind):
    model, x, y = MODELS[kind]()
    stack = residual_model(model.eval())
    chance = 1 - 1 / 40 if kind in ("gpt2", "llama") else 1 - 1 / 5
    reports = [
        compute_indices(stack, (x, y), extra_iterations=2, method=m, error_fn=_error_fn(kind), chance_error=chance)
        for m in ("cached", "reference")
    ]
    for a, b in zip(reports[0].stages, reports[1].stages):
        assert a.e_conv == pytest.approx(b.e_conv) and a.e_drop == pytest.approx(b.e_drop)
        assert a.e_div == pytest.approx(b.e_div)
    assert len(reports[0].stages) == len(stack.stages)


def test_analyze_on_a_vit():
    model, x, y = _vit()
    report = analyze(residual_model(model.eval()), (x, y), measures="all", extra_iterations=2)
    assert len(report.stages) == 1 and len(report.stages[0].anytime_error) == 4 + 2


@pytest.mark.parametrize("kind", ["resnet18", "timm-resnet18", "gpt2"])
def test_full_coupling_keeps_recurrently_initialised_blocks_identical(kind):
    model, x, y = MODELS[kind]()
    stack = residual_model(model.train())
    with torch.no_grad():  # recurrent initialisation: every block of a stage a copy of its first
        for stage in stack.stages:
            first = stage.blocks[0].f.state_dict()
            for block in stage.blocks[1:]:
                block.f.load_state_dict(copy.deepcopy(first))
    coupler = GradientCoupler(stack, 1.0)
    optimizer = torch.optim.SGD(stack.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = lambda out, t: torch.nn.functional.cross_entropy(out.flatten(0, -2), t.flatten())
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(stack(x), y).backward()
        coupler()
        optimizer.step()
    for stage in stack.stages:
        first = dict(stage.blocks[0].f.named_parameters())
        for block in stage.blocks[1:]:
            for name, p in block.f.named_parameters():
                assert torch.equal(p, first[name]), name


def test_objectives_on_a_hugging_face_decoder():
    model, ids, targets = _gpt2()
    stack = residual_model(model.train())
    with record_stages(stack) as stages:
        logits = stack(ids)
    context = ObjectiveContext(
        stack,
        stages.inputs,
        stages.outputs,
        ids,
        targets,
        lambda out, t: torch.nn.functional.cross_entropy(out.flatten(0, -2), t.flatten()),
        torch.Generator().manual_seed(0),
    )
    term = FixedPointResidual()(context)
    term.value.backward()
    assert term.value.item() > 0 and logits.shape == (3, 8, 40)
    assert model.transformer.h[-1].mlp.c_fc.weight.grad is not None


def test_spectral_norm_of_a_conv1d_equals_that_of_the_linear_layer_it_is():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    conv1d = transformers.pytorch_utils.Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs: weight [4, 6]
    linear = torch.nn.Linear(4, 6)
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.t())
        linear.bias.copy_(conv1d.bias)
    for layer in (conv1d, linear):
        spectral_norm(layer, mode="matrix", mu=0.5, hard=True, init_iterations=200)
    torch.testing.assert_close(conv1d.weight.t(), linear.weight, rtol=1e-5, atol=1e-6)
    assert torch.linalg.matrix_norm(conv1d.weight.detach(), ord=2).item() == pytest.approx(0.5, rel=1e-4)
    x = torch.randn(3, 4)
    torch.testing.assert_close(conv1d(x), linear(x), rtol=1e-5, atol=1e-6)


def test_batched_spectral_norm_on_gpt2_skips_the_tie_and_refuses_it_by_name():
    model, ids, _ = _gpt2(layers=2)
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties them
    # Named: refused before anything changes (normalising it would untie the two).
    with pytest.raises(ValueError, match="lm_head.weight is tied to transformer.wte.weight"):
        BatchedSpectralNorm(model, mode="matrix", include=["lm_head", "transformer.h.0.mlp.c_fc"])
    assert not hasattr(model.lm_head, "parametrizations") and not hasattr(
        model.transformer.h[0].mlp.c_fc, "parametrizations"
    )
    # The whole model, the call a user tries first: the tied head is skipped with the Embeddings, in one warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sn = BatchedSpectralNorm(model, mode="matrix", mu=1.0, init_iterations=100)
    (warning,) = [w for w in caught if "BatchedSpectralNorm" in str(w.message)]
    assert "not a supported layer type: transformer.wte, transformer.wpe" in str(warning.message)
    assert "lm_head (tied to transformer.wte.weight)" in str(warning.message)
    names = [n for n, _ in sn.layers]
    assert len(names) == 2 * 4 and all(n.startswith("transformer.h.") for n in names)
    assert {n.split(".")[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}
    assert sn.skipped == ["transformer.wte", "transformer.wpe", "lm_head"]
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie is intact
    model.eval()
    for name, layer in sn.layers:
        assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item() <= 1.0 + 1e-3, name
    assert _logits(model(ids)).shape == (3, 8, 40)


def test_batched_spectral_norm_on_llama_and_a_torchvision_resnet():
    model, ids, _ = _llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sn = BatchedSpectralNorm(model, mode="matrix")
    assert "model.embed_tokens" in sn.skipped and any("embed_tokens" in str(w.message) for w in caught)
    assert "lm_head" in [n for n, _ in sn.layers]  # Llama's head is not tied: normalised
    assert _logits(model(ids)).shape == (3, 8, 40)
    resnet, x, _ = _torchvision("resnet18")
    sn = BatchedSpectralNorm(resnet, mode="operator", example_input=x[:1])
    assert sn.skipped == [] and len(sn.layers) == 21  # 20 convolutions and fc
    assert resnet(x).shape == (4, 5)


@pytest.mark.parametrize("kind", ["resnet18", "vit", "gpt2"])
def test_measuring_the_residual_model_leaves_the_models_mode_as_it_was(kind):
    model, x, y = MODELS[kind]()
    for mode in (False, True):
        model.train(mode)
        compute_indices(residual_model(model), (x, y), extra_iterations=1, error_fn=_error_fn(kind), chance_error=0.9)
        assert all(m.training == mode for m in model.modules())
