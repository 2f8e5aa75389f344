"""Attention kernels on H100 for the ViT-L shapes of the benchmark workloads (heads 16, head_dim 64, bf16).

Compares PyTorch varlen FlashAttention-2, SDPA on equal-shape batches (flash / cuDNN / efficient
backends), and flash-attn when installed, on the workloads' sequence-length mixes. Prints
TFLOP/s per kernel; used to choose what ``attn_implementation="auto"`` runs.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import median_ms

HEADS, HEAD_DIM = 16, 64
CUDA = torch.device("cuda")
MIXES = {
    "uniform_32x448": [1024] * 32,
    "many_small_256x224": [256] * 256,
    "video_8f_448": [8192],
    "mixed_like": [700, 4608, 756, 1536, 1840, 4370, 1564, 1976, 2016, 1152, 816, 1408] * 4 + [2048] * 4,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    for name, lengths in MIXES.items():
        n = sum(lengths)
        q, k, v = (torch.randn(n, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
        flops = 4 * sum(l * l for l in lengths) * HEADS * HEAD_DIM
        row = {}
        from torch.nn.attention.varlen import varlen_attn

        row["varlen_fa2"] = median_ms(lambda: varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths)), CUDA)
        if len(set(lengths)) == 1:
            b, l = len(lengths), lengths[0]
            qb, kb, vb = (t.view(b, l, HEADS, HEAD_DIM).transpose(1, 2) for t in (q, k, v))
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                try:
                    with sdpa_kernel(backend):
                        row[f"sdpa_{backend.name.lower()}"] = median_ms(lambda: F.scaled_dot_product_attention(qb, kb, vb), CUDA)
                except RuntimeError as err:
                    row[f"sdpa_{backend.name.lower()}"] = f"unavailable: {str(err).splitlines()[0][:80]}"
        results[name] = {"tokens": n, "gflop": flops / 1e9, "ms": row,
                         "tflops": {k: flops / (v * 1e-3) / 1e12 for k, v in row.items() if isinstance(v, float)}}
        print(name, json.dumps(results[name]["tflops"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
