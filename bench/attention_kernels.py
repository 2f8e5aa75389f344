#!/usr/bin/env python3
"""Block-diagonal attention kernels on the ViT-L shapes of the benchmark workloads (16 heads, head_dim 64, bf16).

For each sequence-length mix, every candidate kernel that runs on this machine computes the same
block-diagonal attention; the script prints its forward and forward+backward times, TFLOP/s
(forward ``4 * sum(n_i^2) * H * hd``, backward 2.5x that) and its largest error against a float32
reference, so that "faster" is only claimed next to "as exact". Candidates:

- ``varlen_fa2``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's FlashAttention-2);
- ``flash_attn2``: ``flash_attn.flash_attn_varlen_func``, when flash-attn is installed;
- ``flash_attn4``: ``flash_attn.cute.flash_attn_varlen_func`` (the flash-attn-4 package, CuTe DSL), when installed;
- ``flex_document_mask``: compiled FlexAttention with a document mask (block-mask build timed apart);
- ``cudnn_nested``: SDPA's cuDNN backend on a nested (jagged) tensor;
- ``sdpa_<backend>``: SDPA on one ``(B, H, n, hd)`` batch, equal-length mixes only.

Used to choose what ``attn_implementation="auto"`` runs; results in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import time_fn

HEADS, HEAD_DIM = 16, 64
CUDA = torch.device("cuda")
MIXES = {
    "uniform_32x448": [1024] * 32,
    "many_small_256x224": [256] * 256,
    "video_8f_448": [8192],
    "mixed_like": [700, 4608, 756, 1536, 1840, 4370, 1564, 1976, 2016, 1152, 816, 1408] * 4 + [2048] * 4,
}


def reference(q, k, v, lengths: list[int]) -> torch.Tensor:
    """Float32 attention of each sample on itself."""
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start:start + n].float().transpose(0, 1) for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))
        start += n
    return torch.cat(out)


def candidates(lengths: list[int], cu: torch.Tensor) -> dict[str, Callable]:
    """Name -> ``fn(q, k, v) -> (N, H, hd)`` for every kernel this machine can try on ``lengths``."""
    n, max_len = sum(lengths), max(lengths)
    found: dict[str, Callable] = {}
    from torch.nn.attention.varlen import varlen_attn

    found["varlen_fa2"] = lambda q, k, v: varlen_attn(q, k, v, cu, cu, max_len, max_len)
    try:
        from flash_attn import flash_attn_varlen_func as fa2
        found["flash_attn2"] = lambda q, k, v: fa2(q, k, v, cu, cu, max_len, max_len)
    except ImportError:
        pass
    try:
        from flash_attn.cute import flash_attn_varlen_func as fa4
        found["flash_attn4"] = lambda q, k, v: fa4(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                   max_seqlen_q=max_len, max_seqlen_k=max_len)[0]
    except ImportError:
        pass

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(torch.arange(len(lengths), device=CUDA), torch.tensor(lengths, device=CUDA))
    block_mask = create_block_mask(lambda b, h, i, j: doc[i] == doc[j], None, None, n, n, device=CUDA)
    flex = torch.compile(flex_attention, dynamic=False)
    found["flex_document_mask"] = lambda q, k, v: flex(
        *(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask)[0].transpose(0, 1)

    offsets = cu.long()

    def cudnn_nested(q, k, v):
        qn, kn, vn = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qn, kn, vn).transpose(1, 2).values()

    found["cudnn_nested"] = cudnn_nested
    if len(set(lengths)) == 1:
        b, length = len(lengths), lengths[0]
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            def batched(q, k, v, backend=backend):
                qb, kb, vb = (t.view(b, length, HEADS, HEAD_DIM).transpose(1, 2) for t in (q, k, v))
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(n, HEADS, HEAD_DIM)
            found[f"sdpa_{backend.name.lower()}"] = batched
    return found


def block_mask_build_ms(lengths: list[int], iters: int) -> float:
    """Milliseconds to build FlexAttention's document block mask for one pack (paid once per pack)."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = sum(lengths)

    def build():
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=CUDA), torch.tensor(lengths, device=CUDA))
        return create_block_mask(lambda b, h, i, j: doc[i] == doc[j], None, None, n, n, device=CUDA)

    return statistics.median(time_fn(build, 2, iters, CUDA)[0]) * 1e3


def measure(fn: Callable, q, k, v, expected: torch.Tensor, flops: int, iters: int) -> dict:
    """Forward and forward+backward milliseconds, TFLOP/s and max abs error of one kernel."""
    with torch.no_grad():
        err = float((fn(q, k, v).float() - expected).abs().max())
        fwd = statistics.median(time_fn(lambda: fn(q, k, v), 3, iters, CUDA)[0]) * 1e3
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)

    def step():
        fn(qg, kg, vg).backward(grad)

    fwd_bwd = statistics.median(time_fn(step, 3, iters, CUDA)[0]) * 1e3
    return {"max_abs_err": err, "fwd_ms": fwd, "fwd_tflops": flops / fwd / 1e9,
            "fwd_bwd_ms": fwd_bwd, "fwd_bwd_tflops": 3.5 * flops / fwd_bwd / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | heads {HEADS} head_dim {HEAD_DIM} bf16", flush=True)
    results = {}
    for name, lengths in MIXES.items():
        n = sum(lengths)
        gen = torch.Generator(device=CUDA).manual_seed(0)
        q, k, v = (torch.randn(n, HEADS, HEAD_DIM, device=CUDA, dtype=torch.bfloat16, generator=gen) for _ in range(3))
        cu = torch.tensor([0] + lengths, device=CUDA).cumsum(0).to(torch.int32)
        flops = 4 * sum(length * length for length in lengths) * HEADS * HEAD_DIM
        expected = reference(q, k, v, lengths)
        row = {"flex_block_mask_build": {"ms": block_mask_build_ms(lengths, args.iters)}}
        for kernel, fn in candidates(lengths, cu).items():
            try:
                row[kernel] = measure(fn, q, k, v, expected, flops, args.iters)
            except Exception as err:  # a candidate that does not run here is reported, not fatal
                row[kernel] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"}
            r = row[kernel]
            print(f"{name:20s} {kernel:20s} " + (r["error"] if "error" in r else
                  f"fwd {r['fwd_ms']:7.3f} ms {r['fwd_tflops']:6.1f} TFLOP/s | fwd+bwd {r['fwd_bwd_ms']:7.3f} ms "
                  f"{r['fwd_bwd_tflops']:6.1f} TFLOP/s | max err {r['max_abs_err']:.2e}"), flush=True)
        results[name] = {"tokens": n, "samples": len(lengths), "gflop_fwd": flops / 1e9, "kernels": row}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "mixes": results}, f, indent=1)


if __name__ == "__main__":
    main()
