"""The assembled 3D SAM, its presets (architecture + preprocessing) and `build_model`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .image_encoder import REL_POS_LAYOUTS, DetailEncoder3D, ImageEncoder3D
from .layers import fold_detail
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D

NORMALISATIONS = ("zscore_nonzero", "log_suv")
INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Preset:
    """Everything needed to build a model and feed it: architecture plus the crop's preprocessing."""

    name: str
    crop_size: int  # voxels per side of the cubic model input
    spacing_mm: float  # isotropic voxel size the crop is resampled to
    normalisation: str  # "zscore_nonzero": z-score over voxels > 0 of the crop; "log_suv": log(1 + SUV)
    patch_size: int = 16
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14  # 0: every block attends globally
    # How the encoder's relative position terms meet the keys: "per_axis" (this project's models) or
    # "published" (the SAM-Med3D code's broadcast, which its weights were trained with; image_encoder.py).
    rel_pos_layout: str = "per_axis"
    prompt_dim: int = 384
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden: int = 256
    # Channels of the detail encoder (0: none, as published): convolutions over the crop at the low-res
    # logits' grid whose features join the decoder's upscaled ones (see DetailEncoder3D).
    detail_width: int = 0
    # Further voxel sizes the predictor reads each object at (a scale ensemble): their logits are averaged on
    # the stored grid with those at spacing_mm. Inference only: training crops stay at spacing_mm.
    ensemble_spacings_mm: tuple[float, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "global_attn_indexes", tuple(int(i) for i in self.global_attn_indexes))
        object.__setattr__(self, "ensemble_spacings_mm", tuple(float(s) for s in self.ensemble_spacings_mm))
        problems = []
        if self.crop_size % self.patch_size:
            problems.append(f"crop_size {self.crop_size} is not a multiple of patch_size {self.patch_size}")
        if self.normalisation not in NORMALISATIONS:
            problems.append(f"normalisation {self.normalisation!r} is not one of {NORMALISATIONS}")
        if self.encoder_dim % self.encoder_heads:
            problems.append(f"encoder_dim {self.encoder_dim} is not divisible by {self.encoder_heads} heads")
        if self.prompt_dim % 24:  # sin/cos/sin thirds, upscaling to dim/8, attention heads
            problems.append(f"prompt_dim {self.prompt_dim} is not a multiple of 24")
        if self.rel_pos_layout not in REL_POS_LAYOUTS:
            problems.append(f"rel_pos_layout {self.rel_pos_layout!r} is not one of {REL_POS_LAYOUTS}")
        if self.detail_width < 0:
            problems.append(f"detail_width {self.detail_width} must not be negative")
        if any(s <= 0 or s == self.spacing_mm for s in self.ensemble_spacings_mm):
            problems.append(f"ensemble_spacings_mm {list(self.ensemble_spacings_mm)} must be positive and differ "
                            f"from spacing_mm {self.spacing_mm}")
        if problems:
            raise ValueError(f"invalid preset {self.name!r}: " + "; ".join(problems))

    @property
    def embedding_grid(self) -> int:
        """Tokens per side of the image embedding."""
        return self.crop_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Voxels per side of the decoder's low-res logits (and of a mask prompt)."""
        return self.embedding_grid * 4

    @property
    def embedding_bytes(self) -> int:
        """Memory of one cached image embedding (float32), detail features included (`Sam3D.embed`)."""
        detail_channels = self.prompt_dim // 8 if self.detail_width else 0  # what `detail_encoder` hands on
        channels = self.prompt_dim + 64 * detail_channels
        return 4 * channels * self.embedding_grid**3

    def to_dict(self) -> dict:
        """Plain Python values (JSON- and weights_only-safe)."""
        record = dataclasses.asdict(self)
        record["global_attn_indexes"] = list(self.global_attn_indexes)
        record["ensemble_spacings_mm"] = list(self.ensemble_spacings_mm)
        return record

    @classmethod
    def from_dict(cls, record: dict) -> Preset:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"unknown preset fields: {', '.join(unknown)}")
        return cls(**record)


PRESETS: dict[str, Preset] = {
    # The published SAM-Med3D / SegAnyPET configuration ("vit_b_ori", 100.5 M parameters).
    "sam_med3d": Preset(name="sam_med3d", crop_size=128, spacing_mm=1.5, normalisation="zscore_nonzero",
                        rel_pos_layout="published"),
    # This project's default model, sized by measurement on the 2-core CPU it is trained and served on
    # (scripts/benchmark_encoder.py; 2 threads, fp32, random weights). A 64^3 crop at 1.5 mm covers 96 mm
    # (lesions, kidneys, bladder) with 8^3 tokens of 12 mm and 3 mm low-res logits. At 3 mm (192 mm, 6 mm
    # logits) a median lesion of 2.7 mL spans three logits and validation Dice after one click stayed at
    # 0.07-0.12 after 300-580 steps; at 1.5 mm the same run reached 0.46. All-global attention (no padding to
    # pay for). 8.1 M parameters. Measured: encoder 0.047-0.054 s + prompt encoder and decoder 0.005-0.006 s
    # per crop; training step (batch 2, forward + backward + AdamW) 0.36-0.41 s. Alternatives measured the
    # same way (encoder + decoder / training step): dim 192 x 6 blocks 0.044 / 0.25 s; 256 x 4 0.047 /
    # 0.29 s; 384 x 6 0.105 / 0.69 s; prompt dim 384 0.071 / 0.45 s. 256 x 6 keeps a training step well
    # under a second with the most capacity among the cheap ones. Tried and dropped: a full-resolution
    # intensity path into the decoder (a 16-channel 3^3 convolution at 1.5 mm, strided to the logits' grid, added
    # to the upscaled features): validation Dice after one click 0.17 / 0.32 / 0.20 over the first three epochs
    # of 150 steps against 0.24 / 0.28 / 0.29 without it, at 1.3x the step time. A detail encoder (8 channels
    # at the logits' 3 mm grid, zero-initialised) grafted onto the trained model instead did help, and widened
    # to 32 channels helped again (a step of 3 clicks per crop 2.07 s against 1.75 s at 8, side by side on a
    # slow day): the shipped file was fine-tuned both ways (model/README.md). It is served with 1.25 mm crops
    # beside the 1.5 mm ones (ensemble_spacings_mm): on 206 tuning lesions, with 8 channels, Dice after 1 / 3 / 5
    # clicks 0.756 / 0.824 / 0.835 against 0.739 / 0.808 / 0.820 at 1.5 mm alone.
    "segany_pet_small": Preset(
        name="segany_pet_small",
        crop_size=64,
        spacing_mm=1.5,
        normalisation="log_suv",
        patch_size=8,
        encoder_dim=256,
        encoder_depth=6,
        encoder_heads=8,
        global_attn_indexes=(),
        window_size=0,
        prompt_dim=192,
        decoder_depth=2,
        decoder_heads=8,
        decoder_mlp_dim=1024,
        iou_head_hidden=256,
        detail_width=32,
        ensemble_spacings_mm=(1.25,),
    ),
}


class Sam3D(nn.Module):
    """Image encoder, prompt encoder and mask decoder, with the state-dict names of SAM-Med3D."""

    def __init__(self, preset: Preset):
        super().__init__()
        self.preset = preset
        self.image_encoder = ImageEncoder3D(
            crop_size=preset.crop_size,
            patch_size=preset.patch_size,
            dim=preset.encoder_dim,
            depth=preset.encoder_depth,
            num_heads=preset.encoder_heads,
            global_attn_indexes=preset.global_attn_indexes,
            window_size=preset.window_size,
            out_dim=preset.prompt_dim,
            rel_pos_layout=preset.rel_pos_layout,
        )
        self.prompt_encoder = PromptEncoder3D(preset.prompt_dim, preset.embedding_grid, preset.crop_size)
        self.mask_decoder = MaskDecoder3D(
            preset.prompt_dim,
            preset.decoder_depth,
            preset.decoder_heads,
            preset.decoder_mlp_dim,
            preset.iou_head_hidden,
            detail=preset.detail_width > 0,
        )
        if preset.detail_width:
            self.detail_encoder = detail_encoder(preset)
        # Keys a checkpoint did not provide and that were initialised instead (set by load_checkpoint).
        self.initialised_keys: tuple[str, ...] = ()

    def forward(self, image, points=None, boxes=None, masks=None, multimask_output: bool = False):
        """Crop (B, 1, S, S, S) + prompts -> (low-res logits (B, M, L, L, L), IoU estimates (B, M))."""
        return self.decode(self.embed(image), points, boxes, masks, multimask_output)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Crop (B, 1, S, S, S) -> the image embedding (B, C, g, g, g) that `decode` takes; cache it.

        With a detail encoder its features (B, D, L, L, L) ride along folded into channels (B, C + 64 D, g, g,
        g), so that caches, batching and indexing keep handling one tensor; the mask decoder unfolds them.
        """
        embedding = self.image_encoder(image)
        if not self.preset.detail_width:
            return embedding
        return torch.cat([embedding, fold_detail(self.detail_encoder(image).to(embedding.dtype))], dim=1)

    def decode(self, image_embeddings, points=None, boxes=None, masks=None, multimask_output: bool = False):
        """Prompts on a (cached) image embedding; see PromptEncoder3D.forward for the prompt formats."""
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        return self.mask_decoder(
            image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output
        )

    @property
    def inference_dtype(self) -> str:
        """"float32" or "bfloat16": how the image encoder computes (see to_inference_dtype)."""
        return str(self.image_encoder.compute_dtype).removeprefix("torch.")

    def to_inference_dtype(self, dtype: str | torch.dtype) -> Sam3D:
        """Run the image encoder's matmuls in "bfloat16" (or again in "float32"); weights stay float32.

        Opt-in, never a default. Measured on this project's 2-core AVX512-BF16 CPU (scripts/benchmark_encoder.py,
        published preset, random weights): encoder 0.16-0.17 s instead of 0.53-0.56 s; embedding error mean 1.2% and max
        1.3% of the float32 embedding's mean and max magnitude, low-res logits mean 0.4%, max 0.5%; 99.8% of
        the thresholded low-res mask voxels agree. tests/test_model.py bounds it (mean < 2%, max < 10%).
        CPU autocast: LayerNorm, softmax statistics and the residual stream stay float32, which gives ~30% less
        error than all-bf16 weights and activations for ~8% more time, and the switch is reversible. The
        decoder (~0.01 s) always runs in float32. For inference only.
        """
        name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        if name not in INFERENCE_DTYPES:
            raise ValueError(f"inference dtype must be one of {tuple(INFERENCE_DTYPES)}, not {dtype!r}")
        self.image_encoder.compute_dtype = INFERENCE_DTYPES[name]
        return self


def detail_encoder(preset: Preset) -> DetailEncoder3D:
    """A preset's detail encoder, freshly initialised (its output zero)."""
    return DetailEncoder3D(preset.crop_size, preset.low_res_size, preset.detail_width, preset.prompt_dim // 8)


def build_model(preset: Preset | str) -> Sam3D:
    """A randomly initialised model of a preset (a Preset or a name in PRESETS)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise KeyError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    return Sam3D(preset)
