"""The 3D SAM: SAM-Med3D's architecture and state-dict names (published weights load unchanged), presets
(architecture + preprocessing), and checkpoints.

    model = load_checkpoint("model/sam_med3d_turbo.pth")      # or build_model("segany_pet_small")
    embedding = model.embed(crop)                              # (B, 1, S, S, S) -> (B, C, g, g, g); cache it
    low_res_logits, iou = model.decode(embedding, points=(coords, labels), boxes=None, masks=None)

Coordinates are crop voxel indices in tensor axis order (D, H, W).
"""

from .checkpoint import check_state_dict, expected_shapes, load_checkpoint, recognise_preset, save_checkpoint
from .image_encoder import ATTENTION_MODES, ImageEncoder3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import BOX_CORNER_KEYS, PromptEncoder3D
from .sam3d import INFERENCE_DTYPES, NORMALISATIONS, PRESETS, Preset, Sam3D, build_model

__all__ = [
    "ATTENTION_MODES",
    "BOX_CORNER_KEYS",
    "INFERENCE_DTYPES",
    "NORMALISATIONS",
    "PRESETS",
    "ImageEncoder3D",
    "MaskDecoder3D",
    "Preset",
    "PromptEncoder3D",
    "Sam3D",
    "build_model",
    "check_state_dict",
    "expected_shapes",
    "load_checkpoint",
    "recognise_preset",
    "save_checkpoint",
]
