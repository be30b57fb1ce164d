"""The image encoder: a 3D ViT with decomposed relative position bias (SAM-Med3D's "vit_b_ori").

Inside the encoder token grids are channels-last (B, D, H, W, C); the output embedding is channels-first
(B, C_out, g, g, g) with g = crop_size // patch_size.

Windowed blocks of the published model zero-pad the token grid to the window size *after* norm1 and attend
over every position of the window, padding included and unmasked, so the padding changes the result. Two
implementations, chosen by `ImageEncoder3D.attention_mode`:

- "padded": literally that; slow (2744 instead of 512 tokens per window), kept as the reference.
- "exact" (default): the same numbers without the padding. A padded token is zero going into qkv, so all of
  them share one key and one value, the qkv biases (k_pad, v_pad). The relative bias is a sum of one term per
  axis, so for a query the padded keys' summed weight is exp(q.k_pad * scale) times a sum over the padded
  positions of exp(rel_d + rel_h + rel_w), which factorises per axis. Attention over the real keys plus one
  extra key with value v_pad and logit q.k_pad * scale + log(that sum) equals the padded attention; padded
  query rows are cropped away by the reference anyway, so they are never computed.

Two layouts of the relative bias, chosen by the preset's `rel_pos_layout`:

- "per_axis" (this project's models): the term of each axis is added along that axis of the key, as in
  MViTv2 and the 2D SAM: bias(q, k) = q.Rd[qd, kd] + q.Rh[qh, kh] + q.Rw[qw, kw].
- "published" (SAM-Med3D and SegAnyPET weights): the published code broadcasts the three (B, d, h, w, k)
  terms into the (B, qd, qh, qw, kd, kh, kw) attention map with one index too few, so every term's key index
  lands on kw and the query's w index shifts onto a key axis:
  bias(q, k) = q.Rd[qd, kw] + q'.Rh[qh, kw] + q''.Rw[kh, kw], with q' the query at (qd, qh, kd) and q''
  the one at (qd, qh, kh) (padded positions included: their q is the qkv bias). The weights were trained
  with it, so it is reproduced (up to 4e-3 relative on the embedding otherwise). It still factorises per
  kw, so the padded keys' summed weight stays cheap.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FeedForward, LayerNorm3d

ATTENTION_MODES = ("exact", "padded")
REL_POS_LAYOUTS = ("per_axis", "published")


def _relative_table(rel_pos: torch.Tensor, n_query: int, window: int) -> torch.Tensor:
    """Bias vectors for queries 0..n_query-1 against keys 0..window-1 of one axis: (n_query, window, head_dim).

    Row q - k + window - 1 of the table, as the reference indexes it for a window of `window` positions.
    """
    if rel_pos.shape[0] != 2 * window - 1:
        raise ValueError(f"relative position table has {rel_pos.shape[0]} rows, a window of {window} needs "
                         f"{2 * window - 1}")
    q = torch.arange(n_query, device=rel_pos.device)
    k = torch.arange(window, device=rel_pos.device)
    return rel_pos[q[:, None] - k[None, :] + window - 1]


def _key_positions(grid, padding_key: bool, dtype, device) -> torch.Tensor:
    """0/1 matrix (gd + gh + gw [+ 1], N [+ 1]): column j marks key j's position along each axis (and the last
    row the padding key), so that a query's [rel_d | rel_h | rel_w (| padding logit)] times it is the query's
    attention bias. One small matmul instead of a broadcast sum: measured ~2x faster in bf16."""
    gd, gh, gw = grid
    n = gd * gh * gw
    key = torch.arange(n, device=device)
    positions = torch.zeros(gd + gh + gw + padding_key, n + padding_key, dtype=dtype, device=device)
    positions[key // (gh * gw), key] = 1
    positions[gd + key // gw % gh, key] = 1
    positions[gd + gh + key % gw, key] = 1
    if padding_key:
        positions[-1, -1] = 1
    return positions


class RelPosAttention(nn.Module):
    """Multi-head self-attention with a decomposed (per-axis) relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int, layout: str = "per_axis"):
        """`window`: side of the cubic token window the relative position tables span (2 * window - 1 rows);
        `layout`: how the bias terms meet the keys, one of REL_POS_LAYOUTS (see the module docstring)."""
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"encoder dim {dim} is not divisible by {num_heads} heads")
        if layout not in REL_POS_LAYOUTS:
            raise ValueError(f"relative position layout must be one of {REL_POS_LAYOUTS}, not {layout!r}")
        self.num_heads = num_heads
        self.layout = layout
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * window - 1, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * window - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * window - 1, head_dim))

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of tokens x (B, d, h, w, C), each (B, heads, d*h*w, head_dim)."""
        b, n = x.shape[0], x.shape[1] * x.shape[2] * x.shape[3]
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _axis_terms(self, q: torch.Tensor, grid, window) -> list[torch.Tensor]:
        """Relative bias of each query against each key position along each axis (q unscaled, as published).

        One tensor per axis, (B, heads, d, h, w, window_axis), for queries on the grid (d, h, w) sitting at the
        low corner of a window; the bias of a key (kd, kh, kw) is the sum of the three terms.
        """
        rq = q.reshape(*q.shape[:2], *grid, q.shape[-1])
        tables = (self.rel_pos_d, self.rel_pos_h, self.rel_pos_w)
        tables = [_relative_table(t.to(q.dtype), n, w) for t, n, w in zip(tables, grid, window, strict=True)]
        return [
            torch.einsum("bndhwc,dkc->bndhwk", rq, tables[0]),
            torch.einsum("bndhwc,hkc->bndhwk", rq, tables[1]),
            torch.einsum("bndhwc,wkc->bndhwk", rq, tables[2]),
        ]

    def forward(self, x: torch.Tensor, window) -> torch.Tensor:
        """Exact attention of tokens x (B, d, h, w, C) at the low corner of a zero-padded `window` (3 sides).

        Equals `attend_padded` on x zero-padded to the window, restricted to the real tokens.
        """
        b, grid, c = x.shape[0], tuple(x.shape[1:4]), x.shape[-1]
        q, k, v = self._heads(x)
        padded = grid != tuple(window)
        if self.layout == "published":
            bias = self._published_bias(q, grid, window[0])
        else:
            bias = self._per_axis_bias(q, grid, window)
        if padded:
            k_pad, v_pad = (self._qkv_bias(i).view(1, self.num_heads, 1, -1).expand(b, -1, -1, -1) for i in (1, 2))
            k = torch.cat([k, k_pad.to(k.dtype)], dim=2)
            v = torch.cat([v, v_pad.to(v.dtype)], dim=2)
        if q.dtype == torch.bfloat16:  # measured on CPU: bmm + softmax beat the bf16 SDPA kernel 2.5x
            q, k, v, bias = (t.flatten(0, 1) for t in (q, k, v, bias))
            weights = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=self.scale).softmax(-1)
            out = (weights.to(v.dtype) @ v).unflatten(0, (b, self.num_heads))
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, *grid, c))

    def _qkv_bias(self, part: int) -> torch.Tensor:
        """q (0), k (1) or v (2) of a zero token: that part of the qkv bias, (heads * head_dim,)."""
        dim = self.qkv.bias.shape[0] // 3
        return self.qkv.bias[part * dim : (part + 1) * dim]

    def _per_axis_bias(self, q: torch.Tensor, grid, window) -> torch.Tensor:
        """Bias (B, heads, N, N [+ 1]) of the queries against the real keys (and the padding key, if padded)."""
        rel_d, rel_h, rel_w = self._axis_terms(q, grid, window)
        gd, gh, gw = grid
        per_axis = [rel_d[..., :gd], rel_h[..., :gh], rel_w[..., :gw]]  # against the real keys
        padded = grid != tuple(window)
        if padded:
            per_axis.append(self._log_padding_weight(rel_d, rel_h, rel_w, grid)[..., None])
        rel = torch.cat(per_axis, dim=-1).flatten(2, 4)
        return rel @ _key_positions(grid, padded, rel.dtype, rel.device)

    def _published_bias(self, q: torch.Tensor, grid, side: int) -> torch.Tensor:
        """`_per_axis_bias` in the published layout (module docstring), for a cubic window of `side` tokens.

        Per query the bias is term_q[kw] + term_d[kd, kw] + term_h[kh, kw]; term_d and term_h read the queries
        of the query's (qd, qh) row along w, which runs on into the padding (q = the qkv bias there). Summed in
        float32 and cast once: CPU broadcast adds in bf16 measured 4x slower than in float32.
        """
        with torch.autocast(q.device.type, enabled=False):  # float32 throughout, whatever the caller runs
            b, heads = q.shape[:2]
            gd, gh, gw = grid
            n = gd * gh * gw
            rq = q.float().reshape(b, heads, gd, gh, gw, -1)
            q_pad = self._qkv_bias(0).float().view(1, heads, 1, 1, 1, -1)
            row = torch.cat([rq, q_pad.expand(b, -1, gd, gh, side - gw, -1)], dim=4)  # (b, heads, gd, gh, side, c)
            table_d = _relative_table(self.rel_pos_d.float(), gd, side)
            table_h = _relative_table(self.rel_pos_h.float(), gh, side)
            table_w = _relative_table(self.rel_pos_w.float(), side, side)
            term_q = torch.einsum("bndhwc,dkc->bndhwk", rq, table_d)  # (b, heads, gd, gh, gw, kw)
            term_d = torch.einsum("bndhjc,hkc->bndhjk", row, table_h)  # (b, heads, gd, gh, kd, kw)
            term_h = torch.einsum("bndhjc,jkc->bndhjk", row, table_w)  # (b, heads, gd, gh, kh, kw)
            padded = grid != (side,) * 3
            bias = rq.new_empty(b, heads, n, n + padded)
            # The (kd, kh, kw) part is shared by a row's queries: summed once per row, then one pass at full size
            # into the real keys' columns (out=: measured 1.6x faster per block than adding and concatenating,
            # but without autograd, so training copies instead).
            row_part = term_d[..., :gd, None, :gw] + term_h[..., None, :gh, :gw]  # (b, heads, gd, gh, kd, kh, kw)
            real = bias[..., :n].unflatten(-1, grid).unflatten(2, grid)
            terms = row_part[:, :, :, :, None], term_q[..., None, None, :gw]
            if torch.is_grad_enabled() and rq.requires_grad:
                real.copy_(terms[0] + terms[1])
            else:
                torch.add(*terms, out=real)
            if padded:
                # Padded keys: window minus the real box. Per kw the (kd, kh) sums factorise; for kw inside the box
                # the padded (kd, kh) are {kd >= gd} plus {kd < gd, kh >= gh}. logsumexp of an empty range is -inf.
                d_in, d_out = term_d[..., :gd, :].logsumexp(-2), term_d[..., gd:, :].logsumexp(-2)
                h_in, h_out = term_h[..., :gh, :].logsumexp(-2), term_h[..., gh:, :].logsumexp(-2)
                d_all, h_all = torch.logaddexp(d_in, d_out), torch.logaddexp(h_in, h_out)
                inside = torch.logaddexp(d_out + h_all, d_in + h_out)[..., :gw]
                per_kw = torch.cat([inside, (d_all + h_all)[..., gw:]], dim=-1)  # (b, heads, gd, gh, kw)
                padding = (term_q + per_kw[:, :, :, :, None]).logsumexp(-1).clamp_min(-1e4)
                bias[..., n] = padding.reshape(b, heads, n)
        return bias.to(q.dtype)

    @staticmethod
    def _log_padding_weight(rel_d, rel_h, rel_w, grid) -> torch.Tensor:
        """log of the sum over padded key positions of exp(rel_d + rel_h + rel_w), per query: (B, heads, d, h, w).

        The padded positions are the window minus the real box [0, d) x [0, h) x [0, w): three disjoint slabs
        {kd >= d}, {kd < d, kh >= h}, {kd < d, kh < h, kw >= w}, each a product of per-axis sums. Sums of
        positive terms only (no full-minus-real difference), so no cancellation.
        """
        inside, outside, peak = [], [], 0
        for terms, n in zip((rel_d, rel_h, rel_w), grid, strict=True):
            terms = terms.float()
            axis_peak = terms.amax(-1, keepdim=True)
            weights = (terms - axis_peak).exp()  # largest 1: no overflow
            inside.append(weights[..., :n].sum(-1))
            outside.append(weights[..., n:].sum(-1))  # 0 where the window has no padding on this axis
            peak = peak + axis_peak.squeeze(-1)
        (in_d, in_h, in_w), (out_d, out_h, out_w) = inside, outside
        padded = out_d * (in_h + out_h) * (in_w + out_w) + in_d * (out_h * (in_w + out_w) + in_h * out_w)
        # Finite even if every padded weight underflows: the logit goes through a matmul with zeros (-inf * 0).
        return (padded.log() + peak).clamp_min(-1e4).to(rel_d.dtype)

    def attend_padded(self, x: torch.Tensor) -> torch.Tensor:
        """Reference attention over all tokens of x (B, d, h, w, C), padding included: the published algorithm."""
        b, grid, c = x.shape[0], tuple(x.shape[1:4]), x.shape[-1]
        n = grid[0] * grid[1] * grid[2]
        q, k, v = self._heads(x)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        rel_d, rel_h, rel_w = self._axis_terms(q, grid, grid)
        attn = attn.view(b, self.num_heads, *grid, *grid)
        if self.layout == "published":  # the published broadcast, one index short: see the module docstring
            attn = attn + rel_d[..., None, None, :] + rel_h[..., None, :, None, :] + rel_w[..., None, None, :, :]
        else:
            attn = attn + rel_d[..., :, None, None] + rel_h[..., None, :, None] + rel_w[..., None, None, :]
        attn = attn.view(b, self.num_heads, n, n).softmax(dim=-1)
        out = attn @ v
        return self.proj(out.transpose(1, 2).reshape(b, *grid, c))


def _window_runs(size: int, window: int) -> list[tuple[int, int, int]]:
    """An axis of `size` tokens as runs of windows with the same real extent: (start, stop, extent)."""
    full = size // window * window
    runs = [(0, full, window)] if full else []
    if size > full:
        runs.append((full, size, size - full))
    return runs


def _partition(x: torch.Tensor, extent) -> torch.Tensor:
    """(B, D, H, W, C) with D, H, W multiples of `extent` -> windows (B * n_windows, ed, eh, ew, C)."""
    b, d, h, w, c = x.shape
    ed, eh, ew = extent
    x = x.reshape(b, d // ed, ed, h // eh, eh, w // ew, ew, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, ed, eh, ew, c)


def _unpartition(windows: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of `_partition` for a grid of `shape` (B, D, H, W, C)."""
    b, d, h, w, c = shape
    ed, eh, ew = windows.shape[1:4]
    x = windows.reshape(b, d // ed, h // eh, w // ew, ed, eh, ew, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, d, h, w, c)


def windowed_attention(attn: RelPosAttention, x: torch.Tensor, window: int, mode: str) -> torch.Tensor:
    """Attention of tokens x (B, D, H, W, C) in windows of window^3, zero-padded at the high end of each axis."""
    b, d, h, w, c = x.shape
    if mode == "padded":
        padded = F.pad(x, (0, 0, 0, -w % window, 0, -h % window, 0, -d % window))
        out = attn.attend_padded(_partition(padded, (window,) * 3))
        return _unpartition(out, padded.shape)[:, :d, :h, :w]
    # Exact: windows of equal real extent are batched; only the last window along an axis is padded.
    out = torch.empty_like(x)
    runs = itertools.product(_window_runs(d, window), _window_runs(h, window), _window_runs(w, window))
    for (d0, d1, ed), (h0, h1, eh), (w0, w1, ew) in runs:
        part = x[:, d0:d1, h0:h1, w0:w1]
        windows = attn(_partition(part, (ed, eh, ew)), (window,) * 3)
        out[:, d0:d1, h0:h1, w0:w1] = _unpartition(windows, part.shape)
    return out


class EncoderBlock(nn.Module):
    """Pre-norm transformer block; `window_size` 0 means global attention over the whole token grid."""

    def __init__(self, dim: int, num_heads: int, window_size: int, grid: int, rel_pos_layout: str, mlp_ratio: int = 4):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RelPosAttention(dim, num_heads, window_size or grid, rel_pos_layout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, dim * mlp_ratio, nn.GELU)

    def forward(self, x: torch.Tensor, attention_mode: str = "exact") -> torch.Tensor:
        y = self.norm1(x)
        if self.window_size:
            y = windowed_attention(self.attn, y, self.window_size, attention_mode)
        elif attention_mode == "padded":
            y = self.attn.attend_padded(y)
        else:
            y = self.attn(y, tuple(y.shape[1:4]))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping cubic patches -> tokens, channels-last (B, g, g, g, dim)."""

    def __init__(self, patch_size: int, dim: int, in_channels: int = 1):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # kernel == stride: the convolution is one matmul over the flattened patches. Computed as such because
        # oneDNN's bf16 Conv3d with one input channel is ~50x slower than the matmul (fp32: 7 ms slower, ~1%).
        b, c, d, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, d // p, p, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        patches = patches.reshape(b, d // p, h // p, w // p, c * p**3)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class ImageEncoder3D(nn.Module):
    """Crop (B, 1, S, S, S) -> image embedding (B, out_dim, S/p, S/p, S/p)."""

    def __init__(
        self,
        *,
        crop_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        global_attn_indexes: tuple[int, ...],
        window_size: int,
        out_dim: int,
        rel_pos_layout: str = "per_axis",
    ):
        super().__init__()
        grid = crop_size // patch_size
        self.crop_size = crop_size
        self.attention_mode = "exact"  # or "padded": the slow reference, see the module docstring
        self.compute_dtype = torch.float32  # or torch.bfloat16: see Sam3D.to_inference_dtype
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, dim))
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, num_heads, 0 if i in global_attn_indexes else window_size, grid, rel_pos_layout)
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(dim, out_dim, kernel_size=1, bias=False),
            LayerNorm3d(out_dim),
            nn.Conv3d(out_dim, out_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, not {self.attention_mode!r}")
        if x.ndim != 5 or tuple(x.shape[1:]) != (1,) + (self.crop_size,) * 3:
            raise ValueError(f"expected crops of shape (B, 1, {self.crop_size}, {self.crop_size}, {self.crop_size}), "
                             f"got {tuple(x.shape)}")
        # bf16: matmuls in bf16, LayerNorm, softmax statistics and the residual stream in float32 (autocast).
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.compute_dtype == torch.bfloat16):
            x = self.patch_embed(x.to(self.pos_embed.dtype)) + self.pos_embed
            for block in self.blocks:
                x = block(x, self.attention_mode)
            return self.neck(x.permute(0, 4, 1, 2, 3)).to(self.pos_embed.dtype)


class DetailEncoder3D(nn.Module):
    """Local intensity features at the low-res logits' grid, for the mask decoder (this project's addition).

    The ViT sees 12 mm tokens (segany_pet_small); a lesion's edge against an organ, or a lesion narrower than
    a token, is finer than that. Three convolutions over the crop averaged down to the logits' grid (3 mm,
    receptive field 7^3 voxels) give the decoder that detail. The last one starts at zero, so a model given a
    detail encoder answers exactly as before until training moves it.
    """

    def __init__(self, crop_size: int, out_size: int, width: int, out_dim: int):
        super().__init__()
        if crop_size % out_size:
            raise ValueError(f"crop size {crop_size} is not a multiple of the detail grid {out_size}")
        self.pool = crop_size // out_size
        self.convs = nn.Sequential(
            nn.Conv3d(1, width, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv3d(width, width, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv3d(width, width, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv3d(width, out_dim, kernel_size=1),
        )
        nn.init.zeros_(self.convs[-1].weight)
        nn.init.zeros_(self.convs[-1].bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S, S) -> (B, out_dim, S / pool, ...)."""
        return self.convs(F.avg_pool3d(image, self.pool) if self.pool > 1 else image)
