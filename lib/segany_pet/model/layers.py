"""Small building blocks shared by the encoder, the prompt encoder and the mask decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm3d(nn.Module):
    """LayerNorm over the channels of a channels-first volume (B, C, D, H, W)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 4, 1)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 4, 1, 2, 3)


class FeedForward(nn.Module):
    """Linear, activation, linear: the MLP of transformer blocks (state-dict names lin1, lin2)."""

    def __init__(self, dim: int, hidden: int, activation: type[nn.Module]):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """`depth` linear layers with ReLU between them (state-dict names layers.0 ... layers.{depth-1})."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, depth: int):
        super().__init__()
        dims = [dim_in] + [hidden] * (depth - 1) + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def fold_detail(detail: torch.Tensor) -> torch.Tensor:
    """(B, D, 4g, 4g, 4g) -> (B, 64 D, g, g, g): each token's 4^3 block of detail voxels as channels."""
    b, d, size = detail.shape[:3]
    g = size // 4
    blocks = detail.reshape(b, d, g, 4, g, 4, g, 4).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return blocks.reshape(b, d * 64, g, g, g)


def unfold_detail(folded: torch.Tensor) -> torch.Tensor:
    """The inverse of `fold_detail`."""
    b, channels, g = folded.shape[:3]
    d = channels // 64
    blocks = folded.reshape(b, d, 4, 4, 4, g, g, g).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return blocks.reshape(b, d, 4 * g, 4 * g, 4 * g)
