"""The opt-in ``torch.compile`` path computes the same function and stops compiling after warm-up."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from model_pairs import source_and_packed


@torch.no_grad()
def test_compile_fused_matches_eager_across_pack_shapes():
    _, model = source_and_packed(seed=7, num_hidden_layers=2)
    grids = [torch.tensor([[1, 3, 4]]), torch.tensor([[2, 5, 3], [1, 2, 7], [1, 1, 1]]),
             torch.tensor([[1, 6, 6]] * 3), torch.tensor([[4, 2, 9], [1, 7, 1]])]
    inputs = [(torch.randn(int(g.prod(-1).sum()), model.config.patch_dim), g) for g in grids]
    expected = [model(hs, g) for hs, g in inputs]
    torch._dynamo.reset()
    counters.clear()
    model.compile_fused()
    graphs = []
    for (hs, g), ref in zip(inputs, expected):
        out = model(hs, g)
        graphs.append(counters["stats"]["unique_graphs"])
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-4, atol=1e-4)
    assert graphs[-1] == graphs[1] <= 4, graphs  # both layers share graphs; new packs compile nothing new
