"""Model-FLOP accounting shared by the benchmarks: this CPU's matmul floor and a token counter.

`matmul_gflops` is the fp32 torch.mm rate at the current thread count: no step made of matmuls can beat
it, so achieved model GFLOP/s divided by it is the share of the machine a step uses.
`MatmulTokenCounter` counts the tokens that pass through one decoder layer's MLP input projection and
the rows that reach the LM head, by forward hooks on those Linear modules (every path of the decoder,
HF's forward and our fast beam step, calls them), so decoding FLOPs are measured, not estimated:
2 x (matmul parameters of the decoder layers) per token plus 2 x V x D per LM-head row.
"""
from __future__ import annotations

import time

import torch


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """Best-of-`reps` fp32 torch.mm GFLOP/s at the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def layer_matmul_params(backbone) -> int:
    """Parameters of the 2-D weights inside the decoder layers (embeddings and LM head excluded)."""
    head = backbone.get_output_embeddings().weight
    emb = backbone.get_input_embeddings().weight
    return sum(p.numel() for n, p in backbone.named_parameters()
               if p.dim() == 2 and p.data_ptr() not in (head.data_ptr(), emb.data_ptr()) and "lora_" not in n)


class MatmulTokenCounter:
    """Context manager: forward hooks counting decoder tokens and LM-head rows; `.flops` afterwards."""

    def __init__(self, backbone):
        self.backbone = backbone
        first = next(m for n, m in backbone.named_modules() if n.endswith("layers.0.mlp.gate_proj")
                     or n.endswith("layers.0.mlp.up_proj"))
        self.first, self.head = first, backbone.get_output_embeddings()
        self.tokens = self.head_rows = 0
        self.params = layer_matmul_params(backbone)

    def _count(self, attr):
        def hook(module, inputs, output):
            x = inputs[0]
            setattr(self, attr, getattr(self, attr) + x.numel() // x.shape[-1])
        return hook

    def __enter__(self):
        self.handles = [self.first.register_forward_hook(self._count("tokens")),
                        self.head.register_forward_hook(self._count("head_rows"))]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    @property
    def flops(self) -> float:
        return 2.0 * self.params * self.tokens + 2.0 * self.head.weight.numel() * self.head_rows
