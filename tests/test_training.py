"""Training: gradients equal the source model's, and gradient checkpointing (of every layer or of
every k-th) changes nothing but memory."""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch

from golden_cases import patchify
from llava_vit.convert.checkpoint import to_packing_state_dict
from llava_vit.reference import video_in_context
from model_pairs import TINY, image_and_video, pack_image_and_video, source_and_packed

P = TINY["patch_size"]
DEPRECATED_ENABLE = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")


def loss_weights(seed: int, tokens: int, dim: int, samples: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, dim, generator=gen), torch.randn(samples, dim, generator=gen)


def packed_loss(model, inputs, weights):
    out = model(*inputs)
    return (out.last_hidden_state * weights[0]).sum() + (out.pooler_output * weights[1]).sum(), out


def test_gradients_equal_the_source_model_for_images_and_video():
    source, packed = source_and_packed(seed=11)
    image, clip, slots = image_and_video(seed=12)
    inputs = pack_image_and_video(image, clip, slots)
    hidden_states = inputs[0].clone().requires_grad_()
    weights = loss_weights(13, hidden_states.shape[0], TINY["hidden_size"], 2)
    loss, _ = packed_loss(packed.train(), (hidden_states, *inputs[1:]), weights)
    loss.backward()

    image_px = image.clone().requires_grad_()
    padded, visible = video_in_context(clip, slots, P)
    padded.requires_grad_()
    n_image = int(inputs[1][0].prod())
    source_loss = 0
    for k, (args, kwargs) in enumerate((((image_px,), {}), ((padded,), {"visible_indices": visible}))):
        out = source.train()(*args, **kwargs)
        rows = weights[0][:n_image] if k == 0 else weights[0][n_image:]
        source_loss = source_loss + (out["visible_embeddings"][0] * rows).sum() + (out["head_output"][0] * weights[1][k]).sum()
    source_loss.backward()

    torch.testing.assert_close(loss, source_loss, rtol=1e-5, atol=1e-4)
    source_grads = to_packing_state_dict({name: p.grad for name, p in source.named_parameters()}, "timm_source")
    for name, p in packed.named_parameters():
        torch.testing.assert_close(p.grad, source_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    expected_input_grad = torch.cat([patchify(image_px.grad[0], P), patchify(padded.grad[0][:, slots[0]], P)])
    torch.testing.assert_close(hidden_states.grad, expected_input_grad, rtol=1e-4, atol=1e-6)


@DEPRECATED_ENABLE
def test_gradient_checkpointing_changes_neither_outputs_nor_gradients():
    _, plain = source_and_packed(seed=21)
    checkpointed = copy.deepcopy(plain)
    calls = []

    @contextlib.contextmanager
    def counting():
        calls.append(1)
        yield

    checkpointed.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": lambda: (counting(), contextlib.nullcontext())}
    )
    inputs = pack_image_and_video(*image_and_video(seed=22))
    weights = loss_weights(23, inputs[0].shape[0], TINY["hidden_size"], 2)
    results = []
    for model in (plain.train(), checkpointed.train()):
        loss, out = packed_loss(model, inputs, weights)
        loss.backward()
        results.append((out, {name: p.grad for name, p in model.named_parameters()}))
    assert len(calls) == TINY["num_hidden_layers"]  # the user's checkpoint options reached every layer
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a.last_hidden_state, out_b.last_hidden_state)
    assert torch.equal(out_a.pooler_output, out_b.pooler_output)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


LAYERS = 4


def four_layer_model_and_inputs(seed: int):
    _, model = source_and_packed(seed=seed, num_hidden_layers=LAYERS)
    inputs = pack_image_and_video(*image_and_video(seed=seed + 1))
    return model.train(), inputs, loss_weights(seed + 2, inputs[0].shape[0], TINY["hidden_size"], 2)


@DEPRECATED_ENABLE
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("every_k_layers", [1, 2])
def test_every_k_layers_changes_neither_outputs_nor_gradients(every_k_layers, use_reentrant):
    plain, inputs, weights = four_layer_model_and_inputs(seed=31)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"every_k_layers": every_k_layers, "use_reentrant": use_reentrant}
    )
    results = []
    for model in (plain, checkpointed):
        loss, out = packed_loss(model, inputs, weights)
        loss.backward()
        results.append((out, {name: p.grad for name, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b.last_hidden_state, out_a.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(out_b.pooler_output, out_a.pooler_output, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0, msg=name)


@DEPRECATED_ENABLE
@pytest.mark.parametrize("every_k_layers, recomputed", [(1, [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3]), (5, [0])])
def test_every_k_layers_recomputes_exactly_the_selected_layers(every_k_layers, recomputed):
    model, inputs, weights = four_layer_model_and_inputs(seed=41)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"every_k_layers": every_k_layers})
    calls = [0] * LAYERS
    for index, layer in enumerate(model.encoder.layers):  # a recomputed layer runs its first norm again
        layer.layer_norm1.register_forward_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    loss, _ = packed_loss(model, inputs, weights)
    assert calls == [1] * LAYERS
    loss.backward()
    assert [index for index, count in enumerate(calls) if count == 2] == recomputed
    assert [index for index, count in enumerate(calls) if count == 1] == sorted(set(range(LAYERS)) - set(recomputed))


@DEPRECATED_ENABLE
def test_every_k_layers_passes_the_other_options_to_torch_checkpoint(monkeypatch):
    import transformers.modeling_utils

    model, inputs, weights = four_layer_model_and_inputs(seed=51)
    received = []

    def spy(function, *args, **kwargs):
        received.append(kwargs)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", spy)
    options = {"every_k_layers": 2, "use_reentrant": False, "preserve_rng_state": False}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    loss, _ = packed_loss(model, inputs, weights)
    loss.backward()
    assert received == [{"use_reentrant": False, "preserve_rng_state": False}] * 2  # layers 0 and 2
    assert options == {"every_k_layers": 2, "use_reentrant": False, "preserve_rng_state": False}  # not consumed


@pytest.mark.parametrize("every_k_layers", [0, -2, 1.5, "2", True, None])
def test_every_k_layers_rejects_what_is_not_a_positive_int(every_k_layers):
    model, _, _ = four_layer_model_and_inputs(seed=61)
    enable = functools.partial(model.gradient_checkpointing_enable, gradient_checkpointing_kwargs={"every_k_layers": every_k_layers})
    with pytest.raises(ValueError, match=f"every_k_layers: expected a positive int, got {every_k_layers!r}"):
        enable()
    assert not any(layer.gradient_checkpointing for layer in model.encoder.layers)
