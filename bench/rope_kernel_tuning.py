"""Tile sizes of the fused RoPE kernel on the workloads' token counts (ViT-L: 16 heads x 64).

Reports GB/s counting q/k read + written once (the tables are L2-resident), against the
torch reference ``apply_rope`` in bf16.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench import median_ms  # noqa: E402
from llava_vit.model.kernels import _launch_rope  # noqa: E402
from llava_vit.model.rope import apply_rope, rope_cos_sin  # noqa: E402


def main() -> None:
    heads, head_dim = 16, 64
    for tokens in (32768, 111216):
        qkv = torch.randn(tokens, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        cos, sin = rope_cos_sin(torch.randint(0, 64, (tokens, 3), device="cuda"), head_dim)
        qk = qkv[:, :2].flatten(1, 2)
        moved = 2 * qk.numel() * qk.element_size()
        tables = cos.to(torch.bfloat16)[:, None, None], sin.to(torch.bfloat16)[:, None, None]
        ref_ms = median_ms(lambda: apply_rope(qkv[:, :2], *tables), qkv.device)
        print(f"tokens {tokens}: torch reference {ref_ms:.3f} ms ({moved / ref_ms / 1e6:.0f} GB/s)", flush=True)
        for block_rows in (4, 8, 16, 32, 64):
            for num_warps in (2, 4, 8):
                ms = median_ms(lambda: _launch_rope(qk, qk, cos, sin, False, block_rows, num_warps), qkv.device)
                print(f"  block_rows {block_rows:4d} warps {num_warps}: {ms:.3f} ms ({moved / ms / 1e6:.0f} GB/s)", flush=True)


if __name__ == "__main__":
    main()
