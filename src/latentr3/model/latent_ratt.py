"""LatentRATT: the extra attention layer that writes a latent thought into the input embedding space."""
from __future__ import annotations

import math

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class LatentRATT(nn.Module):
    """One attention head of the backbone's width over the backbone's final-layer hidden states.

    The query is the hidden state of the last position before the latent slot; keys and values are the
    hidden states of every earlier real (non-padding) position.  Q, K and V are linear layers with bias;
    a rotary position embedding (base 1000 in the paper) rotates Q and K by the positions the backbone
    gives those tokens, so left padding does not change the result.  The output vector is used as the
    input embedding of the latent token.  Parameters are kept in fp32 whatever the backbone's dtype.
    """

    def __init__(self, hidden_size: int, rope_base: float = 1000.0):
        super().__init__()
        if hidden_size % 2:
            raise ValueError(f"LatentRATT needs an even hidden size for RoPE, got {hidden_size}")
        self.hidden_size = hidden_size
        self.rope_base = rope_base
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        inv_freq = 1.0 / (rope_base ** (torch.arange(0, hidden_size, 2, dtype=torch.float32) / hidden_size))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # (..., D/2)
        angles = torch.cat((angles, angles), dim=-1)
        return x * angles.cos() + rotate_half(x) * angles.sin()

    def forward(self, keys_hidden: torch.Tensor, key_positions: torch.Tensor, key_mask: torch.Tensor,
                query_hidden: torch.Tensor, query_position: torch.Tensor) -> torch.Tensor:
        """keys_hidden (B, T, D), key_positions (B, T), key_mask (B, T) True where attendable,
        query_hidden (B, D), query_position (B,) -> latent (B, D) in fp32."""
        weights = self.attention(keys_hidden, key_positions, key_mask, query_hidden, query_position)
        return torch.einsum("bt,btd->bd", weights, self.v_proj(keys_hidden.float()))

    def attention(self, keys_hidden: torch.Tensor, key_positions: torch.Tensor, key_mask: torch.Tensor,
                  query_hidden: torch.Tensor, query_position: torch.Tensor) -> torch.Tensor:
        """The attention weights (B, T) of the query over the keys (0 at masked positions, rows sum to 1)."""
        q = self._rope(self.q_proj(query_hidden.float()), query_position)          # (B, D)
        k = self._rope(self.k_proj(keys_hidden.float()), key_positions)            # (B, T, D)
        scores = torch.einsum("bd,btd->bt", q, k) / math.sqrt(self.hidden_size)
        scores = scores.masked_fill(~key_mask.bool(), torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1)
