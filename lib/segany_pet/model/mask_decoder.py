"""The mask decoder: a two-way transformer between prompt tokens and the image embedding, then upscaling.

Output tokens are an IoU token and 4 mask tokens; mask token 0 is the single-mask answer, tokens 1-3 the
multimask answers. Low-res logits have 4x the embedding grid per side. With ``detail`` the image embedding
carries a detail encoder's features folded into its channels (`Sam3D.embed`); they are added to the upscaled
image features the mask tokens are matched against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, FeedForward, LayerNorm3d, unfold_detail


class TokenAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections, optionally to a narrower internal width."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        internal = dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"attention width {internal} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, internal)
        self.k_proj = nn.Linear(dim, internal)
        self.v_proj = nn.Linear(dim, internal)
        self.out_proj = nn.Linear(internal, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class TwoWayBlock(nn.Module):
    """Token self-attention, tokens -> image cross-attention, token MLP, image -> tokens cross-attention."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool):
        super().__init__()
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = TokenAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = TokenAttention(dim, num_heads, downsample_rate=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = TokenAttention(dim, num_heads, downsample_rate=2)

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:  # the first block replaces the tokens (no residual), as published
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, num_heads, mlp_dim, i == 0) for i in range(depth))
        self.final_attn_token_to_image = TokenAttention(dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        """image, image_pe (B, C, g, g, g); tokens (B, T, C) -> (tokens (B, T, C), image tokens (B, g^3, C))."""
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        queries = queries + self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries), keys


class MaskDecoder3D(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, mlp_dim: int, iou_head_hidden: int,
                 num_multimask_outputs: int = 3, detail: bool = False):
        super().__init__()
        self.dim = dim
        self.detail = detail
        if dim % 8:
            raise ValueError(f"decoder dim {dim} must be divisible by 8 (upscaling to dim/4, then dim/8)")
        self.num_mask_tokens = num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(dim, depth, num_heads, mlp_dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(dim, iou_head_hidden, self.num_mask_tokens, 3)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> low-res logits (B, M, L, L, L) and IoU estimates (B, M); M = 1, or 3 with multimask_output.

        An embedding of batch 1 serves a batch of prompts (one crop, several prompt sets).
        """
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
        image = image_embeddings.to(tokens.dtype)
        detail = None
        if self.detail:
            image, detail = image[:, : self.dim], unfold_detail(image[:, self.dim :])
        if image.shape[0] != batch:
            image = image.expand(batch, -1, -1, -1, -1)
            detail = None if detail is None else detail.expand(batch, -1, -1, -1, -1)
        image = image + dense_prompt_embeddings
        b, c, *grid = image.shape
        hs, image = self.transformer(image, image_pe.expand(b, -1, -1, -1, -1), tokens)
        iou_token_out, mask_tokens_out = hs[:, 0], hs[:, 1 : 1 + self.num_mask_tokens]
        upscaled = self.output_upscaling(image.transpose(1, 2).reshape(b, c, *grid))
        if detail is not None:
            upscaled = upscaled + detail
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        masks = (hyper_in @ upscaled.flatten(2)).unflatten(-1, upscaled.shape[2:])
        iou = self.iou_prediction_head(iou_token_out)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou[:, chosen]
