"""GPU paths (skipped on machines without a CUDA GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from golden_cases import SET_NAMES, architecture_config, load_cases, pack, patchify, source_path
from llava_vit import LlavaViTPackingConfig, LlavaViTPackingModel, compute_patch_positions_from_grid_thw
from llava_vit.model.attention import (
    FLASH_ATTN4_CAPABILITY_MAJORS,
    PackedSeqs,
    flash_attn4_available,
    resolve_attn_implementation,
    torch_varlen_available,
    varlen_attention,
)
from llava_vit.convert.checkpoint import convert_checkpoint
from model_pairs import TINY, randomize_, source_and_packed

pytestmark = pytest.mark.cuda
TOL = 1e-4


def report(name: str, value: float) -> None:
    print(f"[cuda figure] {name}: {value:.3e}")


needs_flash_attn4 = pytest.mark.skipif(not flash_attn4_available(), reason="needs the flash-attn-4 package")
needs_hopper_or_blackwell = pytest.mark.skipif(
    flash_attn4_available() and torch.cuda.is_available()
    and torch.cuda.get_device_capability()[0] not in FLASH_ATTN4_CAPABILITY_MAJORS,
    reason="flash-attn-4 needs a GPU of compute capability 9.x or 10.x",
)


@torch.no_grad()
@pytest.mark.parametrize("name", SET_NAMES)
def test_golden_float32_on_cuda(name):
    model = convert_checkpoint(source_path(name), config=architecture_config(name)).cuda()
    assert model.config._attn_implementation == "auto"
    cases = load_cases(name, model.config.patch_size)
    hs, grid, pos = pack(cases)
    out = model(hs.cuda(), grid, pos)
    err_last = (out.last_hidden_state.cpu() - torch.cat([c.last_hidden_state for c in cases])).abs().max().item()
    err_pool = (out.pooler_output.cpu() - torch.cat([c.pooler_output for c in cases])).abs().max().item()
    report(f"{name} float32 (sdpa) packed max abs last/pool", max(err_last, err_pool))
    assert err_last <= TOL and err_pool <= TOL
    for case in cases:
        one = model(case.hidden_states.cuda(), case.grid_thw, case.patch_positions)
        assert (one.last_hidden_state.cpu() - case.last_hidden_state).abs().max() <= TOL


@torch.no_grad()
@pytest.mark.skipif(not torch_varlen_available(), reason="torch.nn.attention.varlen missing")
@pytest.mark.parametrize("name", SET_NAMES)
@pytest.mark.parametrize("implementation", ["varlen", "sdpa"])
def test_golden_bfloat16_on_cuda(name, implementation):
    model = convert_checkpoint(source_path(name), config=architecture_config(name))
    model.config._attn_implementation = implementation
    model = model.to("cuda", torch.bfloat16)
    cases = load_cases(name, model.config.patch_size)
    hs, grid, pos = pack(cases)
    out = model(hs.cuda(), grid, pos)
    cos = F.cosine_similarity(out.last_hidden_state.float().cpu(), torch.cat([c.last_hidden_state for c in cases]), dim=-1)
    cos_pool = F.cosine_similarity(out.pooler_output.float().cpu(), torch.cat([c.pooler_output for c in cases]), dim=-1)
    report(f"{name} bfloat16 ({implementation}) min cosine last/pool", min(cos.min().item(), cos_pool.min().item()))
    assert cos.min() >= 0.999 and cos_pool.min() >= 0.999


@torch.no_grad()
@pytest.mark.skipif(not torch_varlen_available(), reason="torch.nn.attention.varlen missing")
def test_backends_agree_on_cuda_bfloat16():
    _, packed = source_and_packed(seed=5)
    packed = packed.to("cuda", torch.bfloat16)
    grid = torch.tensor([[1, 7, 9], [8, 4, 4], [1, 1, 1], [1, 16, 2]])
    hs = torch.randn(int(grid.prod(-1).sum()), packed.config.patch_dim, device="cuda")
    outs = {}
    for impl in ("varlen", "sdpa"):
        packed.config._attn_implementation = impl
        outs[impl] = packed(hs, grid)
    cos = F.cosine_similarity(outs["varlen"].last_hidden_state.float(), outs["sdpa"].last_hidden_state.float(), dim=-1)
    report("varlen vs sdpa bf16 min cosine", cos.min().item())
    assert cos.min() >= 0.999


@torch.no_grad()
def test_packed_matches_source_on_cuda_float32():
    source, packed = source_and_packed(seed=6)
    source, packed = source.cuda(), packed.cuda()
    px = torch.randn(3, 3, 40, 56, device="cuda")
    ref = source(px)
    grid = torch.tensor([[1, 5, 7]] * 3)
    hs = torch.cat([patchify(image, 8) for image in px])
    out = packed(hs, grid)
    assert (out.last_hidden_state - ref["visible_embeddings"].reshape(-1, 64)).abs().max() <= 1e-4
    assert (out.pooler_output - ref["head_output"]).abs().max() <= 1e-4


@torch.no_grad()
@pytest.mark.skipif(not torch_varlen_available(), reason="torch.nn.attention.varlen missing")
def test_forward_has_no_host_sync_with_cpu_grid():
    model = LlavaViTPackingModel(LlavaViTPackingConfig(**TINY)).to("cuda", torch.bfloat16)
    grid = torch.tensor([[1, 16, 16], [8, 8, 8], [1, 10, 30]])
    hs = torch.randn(int(grid.prod(-1).sum()), model.config.patch_dim, device="cuda", dtype=torch.bfloat16)
    model(hs, grid)  # warm-up (kernel selection may sync once)
    torch.cuda.synchronize()
    positions = compute_patch_positions_from_grid_thw(grid).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(hs, grid)
        with_positions = model(hs, grid, positions)  # CUDA patch_positions: checked without reading values
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.pooler_output.shape == (3, TINY["hidden_size"])
    torch.testing.assert_close(with_positions.last_hidden_state, out.last_hidden_state)


def test_rope_kernel_on_cuda_matches_reference():
    from llava_vit.model.kernels import rope_qk
    from llava_vit.model.rope import apply_rope, rope_cos_sin

    n, heads, head_dim = 3000, 16, 64
    cos, sin = rope_cos_sin(torch.randint(0, 64, (n, 3), device="cuda"), head_dim)
    qkv = torch.randn(n, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    ref = apply_rope(qkv[:, :2].float(), cos[:, None, None], sin[:, None, None])
    q, k = rope_qk(qkv.clone(), cos, sin)
    err = (torch.stack([q, k], 1).float() - ref).abs().max().item()
    report("triton rope bf16 max abs vs float32 reference", err)
    assert err <= 2e-2  # one bf16 rounding of O(4) values
    x = qkv.float().requires_grad_()
    grad = torch.randn(n, 2, heads, head_dim, device="cuda")
    (torch.stack(rope_qk(x, cos, sin), 1) * grad).sum().backward()
    x_ref = qkv.float().requires_grad_()
    (apply_rope(x_ref[:, :2], cos[:, None, None], sin[:, None, None]) * grad).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=-1).min().item()


@pytest.mark.parametrize("lengths_q, lengths_k", [
    ((700, 1, 4608, 2100, 33), None),  # the encoder layers' self-attention, mixed lengths
    ((1, 1, 1, 1, 1), (700, 1, 4608, 2100, 33)),  # the pooling head: one query per sample
], ids=["self", "one-query-per-sample"])
@needs_flash_attn4
@needs_hopper_or_blackwell
def test_flash_attention_4_kernel_matches_sdpa(lengths_q, lengths_k):
    """Forward and backward of the flash-attn-4 call against SDPA, bf16, 16 heads of 64."""
    lengths_k = lengths_k or lengths_q
    heads, head_dim = 16, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(sum(lengths_q), heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(sum(lengths_k), heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    seqs_q, seqs_k = (PackedSeqs.from_lengths(n, torch.device("cuda")) for n in (lengths_q, lengths_k))
    grads = {}
    for impl in ("flash_attention_4", "sdpa"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = varlen_attention(*leaves, seqs_q, seqs_k, impl)
        out.float().square().sum().backward()
        grads[impl] = (out.detach(), *(t.grad for t in leaves))
    (out, *dqkv), (ref, *ref_dqkv) = grads["flash_attention_4"], grads["sdpa"]
    cos = _min_cosine(out, ref)
    report(f"flash_attention_4 vs sdpa kernel bf16 out min cosine per token (queries {lengths_q})", cos)
    assert cos >= 0.999
    for name, a, b in zip(("dq", "dk", "dv"), dqkv, ref_dqkv):  # whole tensors: a 1-key sample's dk is 0
        cos = F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()
        report(f"flash_attention_4 vs sdpa kernel bf16 {name} cosine (queries {lengths_q})", cos)
        assert cos >= 0.999, name


@torch.no_grad()
@needs_flash_attn4
@needs_hopper_or_blackwell
def test_flash_attention_4_model_matches_sdpa_on_cuda_bfloat16():
    """A mixed pack (mean length >= 512, so ``auto`` takes flash-attn-4), pooling head included."""
    config = LlavaViTPackingConfig(**{**TINY, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4})
    model = LlavaViTPackingModel(config)
    randomize_(model, 7)
    model = model.to("cuda", torch.bfloat16).eval()
    grid = torch.tensor([[1, 24, 32], [1, 16, 40], [2, 16, 20], [1, 28, 28], [1, 1, 1]])
    lengths = tuple(grid.prod(-1).tolist())
    assert len(set(lengths)) > 1 and sum(lengths) / len(lengths) >= 512
    assert resolve_attn_implementation("auto", torch.device("cuda"), torch.bfloat16, lengths) == "flash_attention_4"
    hs = torch.randn(sum(lengths), config.patch_dim, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for impl in ("flash_attention_4", "sdpa"):
        model.config._attn_implementation = impl
        outs[impl] = model(hs, grid)
    model.config._attn_implementation = "auto"
    tokens = _min_cosine(outs["flash_attention_4"].last_hidden_state, outs["sdpa"].last_hidden_state)
    pooled = _min_cosine(outs["flash_attention_4"].pooler_output, outs["sdpa"].pooler_output)
    report("flash_attention_4 vs sdpa model bf16 min cosine tokens", tokens)
    report("flash_attention_4 vs sdpa model bf16 min cosine pooled (head)", pooled)
    assert tokens >= 0.999 and pooled >= 0.999
