"""Variable-length (block-diagonal) attention over packed sequences, with four backends.

Every backend computes, for each sample independently, ``softmax(q k^T * head_dim^-0.5) v`` on
token-major tensors ``(total_tokens, heads, head_dim)``:

- ``"flash_attention_4"``: ``flash_attn.cute.flash_attn_varlen_func`` from the flash-attn-4
  package (CuTe DSL kernels; CUDA compute capability 9.x or 10.x, float16/bfloat16);
- ``"flash_attention_2"``: ``flash_attn.flash_attn_varlen_func`` (the original implementation's kernel);
- ``"varlen"``: PyTorch's own FlashAttention-2 varlen kernel, ``torch.nn.attention.varlen``
  (CUDA, float16/bfloat16);
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` on every device and dtype,
  one call per distinct sequence shape (samples of equal length are batched, no padding).

flash-attn-4 installs only ``flash_attn/cute/`` under a namespace package ``flash_attn``, so
flash-attn 2 is detected by its package's ``__init__.py``, not by the name ``flash_attn`` alone.
The pooling head's call (one query per sample) runs the same backend as the encoder layers.

``"auto"`` (the default) picks by what the installed packages, device, dtype and the pack allow
(:func:`auto_attn_implementation`). On CUDA in half precision:

1. a pack of equal-length samples runs as one SDPA batch with cuDNN attention first (1.4-1.8x
   the TFLOP/s of varlen FA2 on an H100 at head_dim 64, see ``bench/attention_kernels.py`` and
   docs/PERFORMANCE.md) once its shape has been seen before: cuDNN builds a plan for every new
   shape (tens of milliseconds), which only a shape that comes back repays, so the first pack of
   a shape runs like any other pack;
2. other packs run flash-attn-4 on compute capability 9.x/10.x when their mean sample length is
   at least :data:`FLASH_ATTN4_MIN_MEAN_LENGTH` (512) tokens: on an H200 it ran mixed lengths at
   1.7x the forward TFLOP/s of FA2, but 256-token samples at half;
3. else flash-attn 2, else PyTorch varlen.

Everything else runs SDPA.

:func:`varlen_attention` is excluded from ``torch.compile`` (``torch.compiler.disable``): the
kernels take host-side sequence lengths that would otherwise specialize a compiled graph to one
pack, so compiled code around them serves packs of any lengths.
"""

from __future__ import annotations

import collections
import functools
import importlib.machinery
import importlib.util
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_4", "flash_attention_2", "varlen", "sdpa")
_SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
FLASH_ATTN_INSTALL_HINT = "pip install flash-attn --no-build-isolation"
FLASH_ATTN4_INSTALL_HINT = 'pip install "llava-vit[flash4]"'
FLASH_ATTN4_CAPABILITY_MAJORS = (9, 10)
"""CUDA compute capability majors flash-attn-4 runs on: Hopper (9.x) and Blackwell (10.x)."""
FLASH_ATTN4_MIN_MEAN_LENGTH = 512
"""Mean sample length (tokens) from which ``"auto"`` prefers flash-attn-4 over FA2 (see
:func:`auto_attn_implementation`)."""
_HALF = (torch.float16, torch.bfloat16)


@dataclass(eq=False)
class PackedSeqs:
    """Lengths of the samples of one packed batch, in the forms the kernels want.

    Built once per forward from host-side lengths, so no kernel launch waits on the GPU. A plain
    (not frozen) dataclass on purpose: ``torch.compile`` in torch 2.11 treats a frozen dataclass
    as a constant and guards on its fields, so every new number of samples per pack recompiled
    the layers around the (compile-excluded) attention call; a plain object passes through opaque.
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
    """Whether flash-attn 2 is installed: a regular ``flash_attn`` package (with ``__init__.py``).

    flash-attn-4 alone leaves ``flash_attn`` a namespace package without ``flash_attn_varlen_func``,
    so the name alone is not enough. Nothing is imported.
    """
    spec = importlib.util.find_spec("flash_attn")
    return spec is not None and spec.origin is not None


def flash_attn4_available() -> bool:
    """Whether flash-attn-4 (``flash_attn.cute``) is installed.

    Looks for ``cute`` in the ``flash_attn`` package's folders without importing ``flash_attn``
    (whose ``__init__.py``, when flash-attn 2 is installed too, loads CUDA code); without a
    ``flash_attn`` package the answer is ``False``.
    """
    if "flash_attn.cute" in sys.modules:
        return True
    parent = importlib.util.find_spec("flash_attn")
    if parent is None or not parent.submodule_search_locations:
        return False
    return importlib.machinery.PathFinder.find_spec("flash_attn.cute", list(parent.submodule_search_locations)) is not None


def cuda_compute_capability(device: torch.device) -> tuple[int, int] | None:
    """``(major, minor)`` of a CUDA ``device``; ``None`` for another device or without CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


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
    if name == "flash_attention_4" and not flash_attn4_available():
        raise ImportError(
            "attn_implementation='flash_attention_4' needs the flash-attn-4 package, which is not installed: "
            f"`{FLASH_ATTN4_INSTALL_HINT}`. Or leave attn_implementation unset to use the installed kernels."
        )
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
    shape_seen: bool = True, flash_attn4: bool = False, compute_capability: tuple[int, int] | None = None,
) -> str:
    """The backend ``"auto"`` runs for a pack of sample ``lengths`` on ``device_type``/``dtype``.

    ``flash_attn``, ``torch_varlen`` and ``flash_attn4`` say whether flash-attn 2, PyTorch's varlen
    kernel and flash-attn-4 are installed; ``shape_seen`` whether an equal-length pack of this
    shape ran before; ``compute_capability`` is the CUDA device's ``(major, minor)``.

    flash-attn-4 is taken on capability 9.x/10.x for packs whose mean sample length is at least
    :data:`FLASH_ATTN4_MIN_MEAN_LENGTH`. Measured forward TFLOP/s on an H200 (bf16, 16 heads,
    head_dim 64; FA2 = PyTorch varlen): 32 x 1024 tokens FA4 377 vs FA2 280; 1 x 8192 509 vs 311;
    52 mixed samples of 700-4608 tokens 500 vs 297 (forward+backward 451 vs 253); but 256 x 256
    tokens 108 vs 215. 512 is the midpoint, on a log scale, between the measured 256 (FA2 wins) and
    1024 (FA4 wins). ``docs/perf/h200_2026-11-29_attention_kernels.json`` holds the run.
    """
    if device_type != "cuda" or dtype not in _HALF:
        return "sdpa"
    if len(set(lengths)) == 1 and shape_seen:
        return "sdpa"
    if (
        flash_attn4
        and compute_capability is not None
        and compute_capability[0] in FLASH_ATTN4_CAPABILITY_MAJORS
        and lengths
        and sum(lengths) >= FLASH_ATTN4_MIN_MEAN_LENGTH * len(lengths)
    ):
        return "flash_attention_4"
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
        flash_attn, torch_varlen, flash_attn4 = _installed_kernels()
        flash_attn4 = flash_attn4 and device.type == "cuda"
        return auto_attn_implementation(
            device.type, dtype, lengths, flash_attn, torch_varlen, _seen_before(lengths),
            flash_attn4, cuda_compute_capability(device) if flash_attn4 else None,
        )
    if name in ("flash_attention_4", "flash_attention_2", "varlen") and not (device.type == "cuda" and dtype in _HALF):
        raise ValueError(
            f"attn_implementation={name!r} runs FlashAttention kernels, which need a CUDA device and "
            f"float16/bfloat16; got device={device.type}, dtype={dtype}. Use 'sdpa' or 'auto'."
        )
    if name == "flash_attention_4":
        capability = cuda_compute_capability(device)
        if capability is None or capability[0] not in FLASH_ATTN4_CAPABILITY_MAJORS:
            found = "no usable CUDA device" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
            raise ValueError(
                "attn_implementation='flash_attention_4' runs on CUDA compute capability 9.x (Hopper) or "
                f"10.x (Blackwell); found {found}. Use 'flash_attention_2', 'varlen' or 'auto'."
            )
    return name


@functools.cache
def _installed_kernels() -> tuple[bool, bool, bool]:
    """Whether flash-attn 2, PyTorch's varlen kernel and flash-attn-4 are installed, looked up once
    per process: each lookup searches ``sys.path`` (about 0.1 ms), too slow to repeat every forward."""
    return flash_attn_available(), torch_varlen_available(), flash_attn4_available()


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


def _flash_attn4_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs_q: PackedSeqs, seqs_k: PackedSeqs):
    from flash_attn.cute import flash_attn_varlen_func

    out, _ = flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=seqs_q.cu_seqlens, cu_seqlens_k=seqs_k.cu_seqlens,
        max_seqlen_q=seqs_q.max_seqlen, max_seqlen_k=seqs_k.max_seqlen, causal=False,
    )
    return out


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
    "flash_attention_4": _flash_attn4_varlen,
    "flash_attention_2": _flash_attn_varlen,
    "varlen": _torch_varlen,
    "sdpa": _sdpa_varlen,
}
"""Backend name -> its block-diagonal attention ``(q, k, v, seqs_q, seqs_k) -> out``."""
