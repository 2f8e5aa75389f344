"""Opt-in FP8 inference: the encoder layers' linears as float8 matmuls, through torchao.

:func:`quantize_fp8` converts the weights of the chosen ``nn.Linear`` modules of
``encoder.layers`` (``self_attn.qkv``, ``self_attn.proj``, ``mlp.fc1``, ``mlp.fc2``) to
``float8_e4m3fn`` with one scale per output row, and quantizes each activation row on the fly
(torchao ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``). The patch
embedding and the pooling head stay in bfloat16: they are a small share of the work.

Measured on one H200 (ViT-L, bfloat16, 32 images of 448x448): bf16 eager 52.6 ms, bf16 with
:meth:`~llava_vit.LlavaViTPackingModel.compile_fused` 48.8 ms; FP8 eager 100.3 ms (the activation
quantization runs as separate unfused kernels); FP8 compiled 42.7 ms with every linear converted
(min pooled cosine to bf16 0.9987, min token cosine 0.9957) and 43.0 ms with ``keep_bf16={"fc2"}``
(pooled 0.9993, token 0.9976). Hence ``compile=True`` by default, and ``keep_bf16={"fc2"}`` where
the pooled vectors must agree with bf16 to 0.999.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from .modeling import LlavaViTPackingModel

LINEAR_KINDS = {"qkv": "self_attn.qkv", "proj": "self_attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
"""The linears of one encoder layer: short name -> path inside ``encoder.layers.N``."""

MIN_CAPABILITY = (8, 9)
INSTALL_HINT = 'pip install "llava-vit[fp8]"'


def fp8_linear_names(num_layers: int, keep_bf16: Collection[str | int] | str | int = ()) -> list[str]:
    """The module names :func:`quantize_fp8` converts to float8, in forward order.

    ``keep_bf16`` names what stays in bfloat16; a linear is kept when its kind or its layer is
    named. Entries are linear kinds (``"qkv"``, ``"proj"``, ``"fc1"``, ``"fc2"``: that linear in
    every layer) and layer indices (an ``int``, negative counting from the end: every linear of
    that layer). Examples: ``()`` all linears; ``{"fc2"}`` all but fc2; ``{0, -1}`` all but the
    first and last layer; ``{"fc2", 0, -1}`` both. A single kind or index may be given bare.
    An unknown kind, an index out of range, or keeping every linear raises ``ValueError``; an
    entry of another type raises ``TypeError``.
    """
    entries = (keep_bf16,) if isinstance(keep_bf16, (str, int)) else tuple(keep_bf16)
    kinds, layers = set(), set()
    for entry in entries:
        if isinstance(entry, str):
            if entry not in LINEAR_KINDS:
                raise ValueError(f"keep_bf16: expected a linear kind among {sorted(LINEAR_KINDS)} or a layer index, got {entry!r}")
            kinds.add(entry)
        elif isinstance(entry, int) and not isinstance(entry, bool):
            if not -num_layers <= entry < num_layers:
                raise ValueError(f"keep_bf16: layer index {entry} is out of range for {num_layers} layers "
                                 f"(expected -{num_layers}..{num_layers - 1})")
            layers.add(entry % num_layers)
        else:
            raise TypeError(f"keep_bf16: expected linear kinds (str) and layer indices (int), got {entry!r}")
    names = [f"encoder.layers.{i}.{path}" for i in range(num_layers) if i not in layers
             for kind, path in LINEAR_KINDS.items() if kind not in kinds]
    if not names:
        raise ValueError(f"keep_bf16={sorted(map(str, entries))} keeps every linear in bfloat16: nothing to convert")
    return names


def quantize_fp8(model: LlavaViTPackingModel, *, keep_bf16: Collection[str | int] | str | int = (),
                 compile: bool = True) -> LlavaViTPackingModel:
    """Convert the encoder layers' linears to float8 (row-wise scales), in place, for inference.

    Args:
        model: a bfloat16 :class:`~llava_vit.LlavaViTPackingModel` on a CUDA GPU of capability
            8.9 or newer (Ada, Hopper, Blackwell: FP8 tensor cores), not converted before.
        keep_bf16: linear kinds and layer indices to leave in bfloat16, for accuracy; see
            :func:`fp8_linear_names` (which lists the names that will be converted).
        compile: also call ``model.compile_fused()``. FP8 without it is slower than bf16 (0.52x
            on an H200, ViT-L): the per-row activation quantization only pays once it is fused
            into the neighbouring kernels.

    Returns ``model``. Converting twice raises ``ValueError``; load the model again to choose
    other linears. torchao sets its recommended ``torch._inductor.config`` options (coordinate
    descent tuning among them), which apply to every later compilation in the process.
    """
    if not isinstance(model, LlavaViTPackingModel):
        raise TypeError(f"quantize_fp8: expected a LlavaViTPackingModel, got {type(model).__name__}")
    names = fp8_linear_names(model.config.num_hidden_layers, keep_bf16)
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if name.startswith("encoder.") and isinstance(module, nn.Linear) and type(module.weight) is not nn.Parameter:
            raise ValueError(f"quantize_fp8: {name}.weight is already a {type(module.weight).__name__}; a model is "
                             "converted once (load it again to choose other linears)")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes != {torch.bfloat16}:
        raise ValueError(f"quantize_fp8: expected a bfloat16 model (row-wise float8 matmuls give bfloat16 outputs), "
                         f"got parameters in {sorted(map(str, dtypes))}; call model.to(torch.bfloat16) first")
    for name in names:
        linear = modules[name]
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"quantize_fp8: float8 matmuls need in and out features that are multiples of 16, "
                             f"{name} is {linear.in_features} -> {linear.out_features}; keep it in bf16 with keep_bf16")
    device = model.device
    if device.type != "cuda":
        raise ValueError(f"quantize_fp8: expected the model on a CUDA device, got {device}")
    capability = tuple(torch.cuda.get_device_capability(device))
    if capability < MIN_CAPABILITY:
        raise ValueError(f"quantize_fp8: FP8 tensor cores need CUDA capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                         f"or newer (Ada, Hopper or later), {device} has {capability[0]}.{capability[1]}")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as error:
        raise ImportError(f"quantize_fp8 needs torchao>=0.17, which is not installed: {INSTALL_HINT}") from error

    selected = set(names)
    precision = torch.get_float32_matmul_precision()
    try:
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda module, fqn: fqn in selected)
    finally:
        torch.set_float32_matmul_precision(precision)  # torchao 0.17 sets "high" process-wide
    if compile:
        model.compile_fused()
    return model
