"""GPU paths (skipped on machines without a CUDA GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from golden_cases import SET_NAMES, architecture_config, load_cases, pack, patchify, source_path
from llava_vit import LlavaViTPackingConfig, LlavaViTPackingModel, compute_patch_positions_from_grid_thw
from llava_vit.model.attention import torch_varlen_available
from llava_vit.convert.checkpoint import convert_checkpoint
from model_pairs import TINY, source_and_packed

pytestmark = pytest.mark.cuda
TOL = 1e-4


def report(name: str, value: float) -> None:
    print(f"[cuda figure] {name}: {value:.3e}")


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
