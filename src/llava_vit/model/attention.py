"""Variable-length (block-diagonal) attention over packed sequences, with three backends.

Every backend computes, for each sample independently, ``softmax(q k^T * head_dim^-0.5) v`` on
token-major tensors ``(total_tokens, heads, head_dim)``:

- ``"flash_attention_2"``: ``flash_attn.flash_attn_varlen_func`` (the original implementation's kernel);
- ``"varlen"``: PyTorch's own FlashAttention-2 varlen kernel, ``torch.nn.attention.varlen``
  (CUDA, float16/bfloat16);
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` on every device and dtype,
  one call per distinct sequence shape (samples of equal length are batched, no padding).

``"auto"`` (the default) picks by what the installed packages, device, dtype and the pack allow:
on CUDA in half precision, a pack of equal-length samples runs as one SDPA batch with cuDNN
attention first (1.4-1.8x the TFLOP/s of varlen FA2 on an H100 at head_dim 64, see
``bench/attention_kernels.py`` and docs/PERFORMANCE.md) once its shape has been seen before:
cuDNN builds a plan for every new shape (tens of milliseconds), which only a shape that comes
back repays, so the first pack of a shape runs like any other pack. Other packs run flash-attn,
else PyTorch varlen. Everything else runs SDPA (:func:`auto_attn_implementation`).

:func:`varlen_attention` is excluded from ``torch.compile`` (``torch.compiler.disable``): the
kernels take host-side sequence lengths that would otherwise specialize a compiled graph to one
pack, so compiled code around them serves packs of any lengths.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "varlen", "sdpa")
_SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
FLASH_ATTN_INSTALL_HINT = "pip install flash-attn --no-build-isolation"


@dataclass(frozen=True)
class PackedSeqs:
    """Lengths of the samples of one packed batch, in the forms the kernels want.

    Built once per forward from host-side lengths, so no kernel launch waits on the GPU.
    """

    lengths: tuple[int, ...]
    cu_seqlens: torch.Tensor = field(repr=False)
    max_seqlen: int

    @classmethod
    def from_lengths(cls, lengths: list[int] | tuple[int, ...], device: torch.device) -> PackedSeqs:
        lengths = tuple(int(n) for n in lengths)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
        return cls(lengths, cu.to(device, non_blocking=True), max(lengths, default=0))


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def torch_varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def check_attn_implementation(name: str | None) -> str:
    """Validate a requested backend name; ``None`` means ``"auto"``."""
    name = "auto" if name is None else name
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")
    if name == "flash_attention_2" and not flash_attn_available():
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package, which is not installed: "
            f"`{FLASH_ATTN_INSTALL_HINT}`. Or leave attn_implementation unset to use PyTorch's own kernels."
        )
    if name == "varlen" and not torch_varlen_available():
        raise ImportError(
            f"attn_implementation='varlen' needs torch.nn.attention.varlen (PyTorch >= 2.10); "
            f"this is PyTorch {torch.__version__}"
        )
    return name


def auto_attn_implementation(
    device_type: str, dtype: torch.dtype, lengths: tuple[int, ...], flash_attn: bool, torch_varlen: bool,
    shape_seen: bool = True,
) -> str:
    """The backend ``"auto"`` runs for a pack of sample ``lengths`` on ``device_type``/``dtype``,
    given whether flash-attn and PyTorch's varlen kernel are installed and whether a pack of this
    shape (equal lengths) ran before."""
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    if len(set(lengths)) == 1 and shape_seen:
        return "sdpa"
    if flash_attn:
        return "flash_attention_2"
    if torch_varlen:
        return "varlen"
    return "sdpa"


def resolve_attn_implementation(
    name: str | None, device: torch.device, dtype: torch.dtype, lengths: tuple[int, ...] = ()
) -> str:
    """The backend that runs for ``name`` on ``device``/``dtype`` and a pack of sample ``lengths``
    (``"auto"`` picks the fastest, see :func:`auto_attn_implementation`)."""
    name = check_attn_implementation(name)
    if name == "auto":
        return auto_attn_implementation(device.type, dtype, lengths, flash_attn_available(), torch_varlen_available(),
                                        _seen_before(lengths))
    if name in ("flash_attention_2", "varlen") and not (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)):
        raise ValueError(
            f"attn_implementation={name!r} runs FlashAttention kernels, which need a CUDA device and "
            f"float16/bfloat16; got device={device.type}, dtype={dtype}. Use 'sdpa' or 'auto'."
        )
    return name


_EQUAL_SHAPES: collections.OrderedDict[tuple[int, int], None] = collections.OrderedDict()
_EQUAL_SHAPES_KEPT = 64
"""Equal-length pack shapes ``(samples, length)`` seen lately (least recently seen dropped first)."""


def _seen_before(lengths: tuple[int, ...]) -> bool:
    """Whether an equal-length pack of this shape ran before; records it."""
    if not lengths or len(set(lengths)) != 1:
        return False
    shape = (len(lengths), lengths[0])
    seen = shape in _EQUAL_SHAPES
    _EQUAL_SHAPES[shape] = None
    _EQUAL_SHAPES.move_to_end(shape)
    if len(_EQUAL_SHAPES) > _EQUAL_SHAPES_KEPT:
        _EQUAL_SHAPES.popitem(last=False)
    return seen


@torch.compiler.disable
def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs_q: PackedSeqs, seqs_k: PackedSeqs, implementation: str
) -> torch.Tensor:
    """Attention of each query sample on its key sample; ``(Tq, H, hd)`` in, ``(Tq, H, hd)`` out."""
    try:
        kernel = ATTENTION_KERNELS[implementation]
    except KeyError:
        raise ValueError(f"unknown attention implementation {implementation!r}") from None
    return kernel(q, k, v, seqs_q, seqs_k)


def _torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs_q: PackedSeqs, seqs_k: PackedSeqs):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, seqs_q.cu_seqlens, seqs_k.cu_seqlens, seqs_q.max_seqlen, seqs_k.max_seqlen)


def _flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs_q: PackedSeqs, seqs_k: PackedSeqs):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, seqs_q.cu_seqlens, seqs_k.cu_seqlens, seqs_q.max_seqlen, seqs_k.max_seqlen,
        dropout_p=0.0, causal=False,
    )


def _sdpa_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs_q: PackedSeqs, seqs_k: PackedSeqs):
    heads, head_dim = q.shape[1:]
    if len(set(zip(seqs_q.lengths, seqs_k.lengths))) == 1:  # one shape: the whole pack is a batch
        out = _sdpa_batch(q, k, v, len(seqs_q.lengths), seqs_q.lengths[0], seqs_k.lengths[0])
        return out.reshape(q.shape)
    out = q.new_empty(q.shape)
    for (len_q, len_k), (rows_q, rows_k) in _shape_groups(seqs_q.lengths, seqs_k.lengths, q.device).items():
        count = rows_q.numel() // len_q
        out[rows_q] = _sdpa_batch(q[rows_q], k[rows_k], v[rows_k], count, len_q, len_k).reshape(-1, heads, head_dim)
    return out


def _sdpa_batch(q, k, v, count: int, len_q: int, len_k: int) -> torch.Tensor:
    """SDPA on ``count`` samples of equal shape stored back to back; returns ``(count, len_q, H, hd)``."""
    q = q.reshape(count, len_q, *q.shape[1:]).transpose(1, 2)
    k = k.reshape(count, len_k, *k.shape[1:]).transpose(1, 2)
    v = v.reshape(count, len_k, *v.shape[1:]).transpose(1, 2)
    if q.is_cuda:
        with sdpa_kernel(_SDPA_PRIORITY, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


@functools.lru_cache(maxsize=32)
def _shape_groups(lengths_q: tuple[int, ...], lengths_k: tuple[int, ...], device: torch.device):
    """Token rows of the samples sharing each ``(len_q, len_k)``, for batched SDPA calls."""
    starts_q = torch.tensor((0, *lengths_q)).cumsum(0)[:-1].tolist()
    starts_k = torch.tensor((0, *lengths_k)).cumsum(0)[:-1].tolist()
    groups: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    for sq, lq, sk, lk in zip(starts_q, lengths_q, starts_k, lengths_k):
        rows_q, rows_k = groups.setdefault((lq, lk), ([], []))
        rows_q.extend(range(sq, sq + lq))
        rows_k.extend(range(sk, sk + lk))
    with torch.inference_mode(False):  # cached across calls: must stay usable by autograd later
        return {
            shape: (torch.tensor(rq, device=device), torch.tensor(rk, device=device))
            for shape, (rq, rk) in groups.items()
        }


ATTENTION_KERNELS = {
    "flash_attention_2": _flash_attn_varlen,
    "varlen": _torch_varlen,
    "sdpa": _sdpa_varlen,
}
"""Backend name -> its block-diagonal attention ``(q, k, v, seqs_q, seqs_k) -> out``."""
