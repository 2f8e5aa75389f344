"""CUDA graphs for a service with one fixed input size.

At one image per call (224x224 or 448x448) the forward is launch-bound: the GPU finishes each
kernel faster than the host launches the next. A CUDA graph records the kernels of the encode
step once and replays them with one launch. Only device work can be recorded, so the host work of
a forward (input checks, backend choice, sample lengths and RoPE tables built and copied to the
device) is done once, by :meth:`~llava_vit.model.modeling.LlavaViTPackingModel.prepare`, for the
one pack layout the graph serves.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..validation import check_hidden_states, check_positive_int
from .attention import _shape_groups
from .modeling import LlavaViTPackingModel


class CUDAGraphEncoder:
    """``model``'s forward for one fixed pack layout, captured as a CUDA graph.

    Args:
        model: a :class:`~llava_vit.model.modeling.LlavaViTPackingModel` on a CUDA device, in the
            dtype to serve in. Its weights are read in place: later changes to them show in the
            replays; moving or casting the model needs a new encoder.
        grid_thw, patch_positions: the pack layout of every call, as :meth:`forward` takes them.
            With ``attn_implementation="auto"`` the backend is chosen here, once.
        warmup: eager runs before capture, on a side stream (the PyTorch CUDA graphs recipe): they
            do what must not happen during capture (Triton compilation, cuDNN plans, kernel
            selection, allocations).

    Calling it with ``hidden_states`` ``(seq_len, C*p*p)`` (``seq_len`` of ``grid_thw``; on the
    model's device or the CPU, any floating dtype, cast to the model's like :meth:`forward`) copies
    them into the graph's input buffer, replays the graph and returns a
    ``BaseModelOutputWithPooling`` (``last_hidden_state``, ``pooler_output``). Its tensors are the
    graph's static outputs: the next call overwrites them, so clone what you keep. The graph runs
    without autograd (captured under ``torch.no_grad()``); calls work with or without
    ``torch.no_grad()``/``torch.inference_mode()``.
    """

    def __init__(
        self,
        model: LlavaViTPackingModel,
        grid_thw: torch.Tensor,
        patch_positions: torch.Tensor | None = None,
        warmup: int = 3,
    ):
        weight = model.patch_embed.proj.weight
        if weight.device.type != "cuda":
            raise ValueError(
                f"CUDAGraphEncoder needs a model on a CUDA device (CUDA graphs are a CUDA feature); this model "
                f"is on {weight.device}. Move it first: model.to('cuda', torch.bfloat16)"
            )
        warmup = check_positive_int("warmup", warmup)
        self.model = model
        # Normal (not inference) tensors, so that calls with and without inference_mode can write the input.
        with torch.cuda.device(weight.device), torch.inference_mode(False), torch.no_grad():
            self.pack = model.prepare(grid_thw, patch_positions)
            self.input_shape = (self.pack.seq_len, model.config.patch_dim)
            self._input = torch.zeros(self.input_shape, device=weight.device, dtype=weight.dtype)
            self._held = self._sdpa_index_tensors()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    model.encode(self._input, self.pack)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._output = model.encode(self._input, self.pack)

    def _sdpa_index_tensors(self) -> list:
        """The cached token-index tensors the SDPA backend uses for packs of several sample shapes.

        The graph reads their memory on every replay; they live in a bounded cache that may drop
        them, so the encoder holds them too.
        """
        if self.pack.backend != "sdpa":
            return []
        device = self._input.device
        queries = (self.pack.seqs, self.pack.probe_seqs)
        return [_shape_groups(q.lengths, self.pack.seqs.lengths, device) for q in queries if q is not None]

    def __call__(self, hidden_states: torch.Tensor) -> BaseModelOutputWithPooling:
        device = self._input.device
        check_hidden_states(hidden_states, self.input_shape[1], device)
        if tuple(hidden_states.shape) != self.input_shape:
            raise ValueError(
                f"hidden_states must have the shape this CUDA graph was captured for, (seq_len, patch_dim) = "
                f"{self.input_shape}; got {tuple(hidden_states.shape)}. Build a CUDAGraphEncoder for each input size."
            )
        with torch.cuda.device(device), torch.no_grad():
            self._input.copy_(hidden_states, non_blocking=True)
            self.graph.replay()
        return BaseModelOutputWithPooling(
            last_hidden_state=self._output.last_hidden_state, pooler_output=self._output.pooler_output
        )
