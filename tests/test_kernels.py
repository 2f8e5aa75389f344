"""The fused Triton RoPE kernel equals the reference rotation, forward and gradient.

Runs the kernel in Triton's interpreter on the CPU (a subprocess, since the interpreter is chosen
at import time); ``tests/test_cuda.py`` runs it compiled on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from llava_vit.model.kernels import triton_available

CHECK = textwrap.dedent("""
    import torch
    from llava_vit.model.kernels import rope_qk
    from llava_vit.model.rope import apply_rope, rope_cos_sin

    torch.manual_seed(0)
    for n, heads, head_dim in ((37, 3, 64), (5, 2, 96), (1, 1, 32)):
        cos, sin = rope_cos_sin(torch.randint(0, 64, (n, 3)), head_dim)
        ref_tables = cos[:, None, None], sin[:, None, None]
        qkv = torch.randn(n, 3, heads, head_dim)
        ref = apply_rope(qkv[:, :2], *ref_tables)
        inplace = qkv.clone()
        q, k = rope_qk(inplace, cos, sin)
        assert q.data_ptr() == inplace.data_ptr(), "no-grad path must rotate in place"
        torch.testing.assert_close(torch.stack([q, k], 1), ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(inplace[:, 2], qkv[:, 2]), "v must be untouched"

        x = qkv.clone().requires_grad_()
        grad = torch.randn(n, 2, heads, head_dim)
        (torch.stack(rope_qk(x, cos, sin), 1) * grad).sum().backward()
        x_ref = qkv.clone().requires_grad_()
        (apply_rope(x_ref[:, :2], *ref_tables) * grad).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    print("ok")
""")


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed (CPU-only PyTorch build)")
def test_rope_kernel_matches_reference_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
