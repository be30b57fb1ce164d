"""The prompt encoder: clicks, boxes and a previous mask -> sparse and dense prompt embeddings.

Coordinates are crop voxel indices in tensor axis order (D, H, W). A point or box corner c is encoded at
(c + 0.5) / crop_size, the centre of its voxel, as the published model does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import LayerNorm3d

# point_embeddings.{index}: what is added to a sparse prompt's position encoding.
NEGATIVE, POSITIVE, BOX_MIN_CORNER, BOX_MAX_CORNER = 0, 1, 2, 3
# Added by this project (real 3D boxes); absent from published checkpoints, which had only 0 and 1.
BOX_CORNER_KEYS = (
    f"prompt_encoder.point_embeddings.{BOX_MIN_CORNER}.weight",
    f"prompt_encoder.point_embeddings.{BOX_MAX_CORNER}.weight",
)


class RandomFourierEncoding(nn.Module):
    """Position in [0, 1]^3 -> [sin, cos, sin] of 2*pi*(2c - 1) @ G, with G a fixed Gaussian (3, dim // 3).

    The second sin (instead of a third frequency set) is the published model's; kept for its weights.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 3:
            raise ValueError(f"prompt dim {dim} must be divisible by 3 (sin, cos, sin of dim/3 frequencies)")
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, dim // 3))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 3) in [0, 1] -> (..., dim)."""
        projected = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([projected.sin(), projected.cos(), projected.sin()], dim=-1)


class PromptEncoder3D(nn.Module):
    def __init__(self, dim: int, embedding_grid: int, crop_size: int, mask_channels: int = 16):
        super().__init__()
        self.dim = dim
        self.embedding_grid = embedding_grid
        self.crop_size = crop_size
        self.pe_layer = RandomFourierEncoding(dim)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_channels // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_channels // 4),
            nn.GELU(),
            nn.Conv3d(mask_channels // 4, mask_channels, kernel_size=2, stride=2),
            LayerNorm3d(mask_channels),
            nn.GELU(),
            nn.Conv3d(mask_channels, dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    @property
    def mask_input_size(self) -> int:
        """Side of the mask prompt: the decoder's low-res logits, 4x the embedding grid."""
        return 4 * self.embedding_grid

    def get_dense_pe(self) -> torch.Tensor:
        """Position encoding of the embedding grid, (1, dim, g, g, g).

        Quirk kept from the published model: the encoded coordinate of grid cell (i, j, k) is
        ((j + .5) / g, (i + .5) / g, (k + .5) / g), first two axes swapped relative to how points are encoded.
        """
        g = self.embedding_grid
        centres = (torch.arange(g, device=self.no_mask_embed.weight.device, dtype=torch.float32) + 0.5) / g
        i, j, k = torch.meshgrid(centres, centres, centres, indexing="ij")
        pe = self.pe_layer.encode(torch.stack([j, i, k], dim=-1))
        return pe.permute(3, 0, 1, 2).unsqueeze(0)

    def _encode_coords(self, coords: torch.Tensor) -> torch.Tensor:
        return self.pe_layer.encode((coords.float() + 0.5) / self.crop_size)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        if pad:  # the published model always saw a padding point when there was no box
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 3)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        labels = labels[..., None]
        pe = self._encode_coords(coords)
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight, pe)
        embedding = embedding + (labels == NEGATIVE) * self.point_embeddings[NEGATIVE].weight
        return embedding + (labels == POSITIVE) * self.point_embeddings[POSITIVE].weight

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes (B, 6) or (B, 2, 3): min corner then max corner, crop voxel indices -> (B, 2, dim)."""
        corners = self._encode_coords(boxes.reshape(-1, 2, 3))
        return corners + torch.cat(
            [self.point_embeddings[BOX_MIN_CORNER].weight, self.point_embeddings[BOX_MAX_CORNER].weight]
        )

    def forward(self, points=None, boxes=None, masks=None) -> tuple[torch.Tensor, torch.Tensor]:
        """points (coords (B, N, 3) float, labels (B, N) int: 1 positive, 0 negative, -1 padding) or None;
        boxes (B, 6) | (B, 2, 3) or None; masks (B, 1, L, L, L) low-res logits or None.

        Returns sparse (B, n_prompts, dim) and dense (B, dim, g, g, g) embeddings.
        """
        given = (points[0] if points is not None else None, boxes, masks)
        batch = next((p.shape[0] for p in given if p is not None), 1)
        weight = self.no_mask_embed.weight
        sparse = [weight.new_empty(batch, 0, self.dim)]
        if points is not None:
            sparse.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        sparse = torch.cat(sparse, dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks.to(weight.dtype))
        else:
            g = self.embedding_grid
            dense = weight.reshape(1, -1, 1, 1, 1).expand(batch, -1, g, g, g)
        return sparse, dense
