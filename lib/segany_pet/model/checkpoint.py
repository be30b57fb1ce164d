"""Loading published and own checkpoints into a Sam3D, and saving own checkpoints.

Accepted files:
- this project's own: {"format": "segany_pet", "preset": Preset.to_dict(), "model_state_dict": ...}; the
  preset (architecture and preprocessing) is read from the file;
- published SAM-Med3D / SegAnyPET files: {"model_state_dict": ..., "args": argparse.Namespace, ...} or a bare
  state dict, keys possibly prefixed "module." (saved from DDP); the preset is recognised from the keys.

Keys and shapes are checked strictly. Only the box-corner embeddings this project adds may be absent from a
published file; they are then initialised (reproducibly) and listed in `model.initialised_keys`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from .prompt_encoder import BOX_CORNER_KEYS
from .sam3d import PRESETS, Preset, Sam3D, detail_encoder

log = logging.getLogger(__name__)

FORMAT = "segany_pet"
FORMAT_VERSION = 1
_RESERVED = ("format", "format_version", "preset", "model_state_dict")
# Keys whose shapes describe an architecture in messages (patch size and width, crop size, prompt width).
_SIGNATURE_KEYS = (
    "image_encoder.patch_embed.proj.weight",
    "image_encoder.pos_embed",
    "prompt_encoder.no_mask_embed.weight",
)
DETAIL_PREFIX = "detail_encoder."
_SHOWN = 5  # keys named per problem in an error message


@functools.cache
def expected_shapes(preset: Preset) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of a preset's model (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = Sam3D(preset)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    detail = str(error).splitlines()[0] if str(error) else "no detail"
    detail = detail if len(detail) <= 120 else detail[:117] + "..."
    return CheckpointError(f"cannot read checkpoint {path}: damaged (truncated, partly copied?) or not a torch "
                           f"file ({type(error).__name__}: {detail})")


def _read(path: Path, allow_unsafe_pickle: bool):
    """Unpickle a file with weights_only=True (plus argparse.Namespace, which published files pickle under
    "args": rebuilding it runs no code); fall back to a full unpickle only if permitted, with a warning."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    # Memory-mapped: tensors are read when used, so a published file's optimizer state is never loaded.
    mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if not str(error).startswith("Weights only load failed"):
            raise _unreadable(path, error) from None
        weights_only_error = error
    except Exception as error:  # truncated zip, garbage bytes, empty file ...
        raise _unreadable(path, error) from None
    try:
        objects = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "unknown objects"
    except Exception:
        objects = "unknown objects"
    if not allow_unsafe_pickle:
        raise CheckpointError(
            f"checkpoint {path} pickles objects other than tensors ({objects}); refusing a full unpickle"
        ) from weights_only_error
    log.warning("checkpoint %s pickles objects other than tensors (%s): loading it with weights_only=False, "
                "which runs code from the file; only use files from a trusted source", path, objects)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as error:
        raise _unreadable(path, error) from None


def _unpack(obj, path: Path) -> tuple[dict, Preset | None, dict]:
    """-> (state dict, preset recorded in the file or None, other entries of an own-format file)."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        try:
            preset = Preset.from_dict(obj["preset"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {path} has no valid preset record: {error}") from None
        state = obj.get("model_state_dict")
        extra = {k: v for k, v in obj.items() if k not in _RESERVED}
    elif isinstance(obj, dict) and "model_state_dict" in obj:
        state, preset, extra = obj["model_state_dict"], None, {}
    else:
        state, preset, extra = obj, None, {}
    if not isinstance(state, dict) or not state:
        raise CheckpointError(
            f"{path} is not a model checkpoint: expected a state dict (key -> tensor) or a dict with "
            f"'model_state_dict', got {type(state).__name__}" + (" (empty)" if isinstance(state, dict) else "")
        )
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{path} is not a model checkpoint: {len(not_tensors)} of {len(state)} entries are not tensors "
            f"({_listing(not_tensors)})"
        )
    # Saved from DistributedDataParallel: every key carries "module.".
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, preset, extra


def _describe(shapes: dict[str, tuple[int, ...]]) -> str:
    blocks = {k.split(".")[2] for k in shapes if k.startswith("image_encoder.blocks.")}
    parts = [f"{k} {list(shapes[k]) if k in shapes else 'missing'}" for k in _SIGNATURE_KEYS]
    return f"{len(blocks)} encoder blocks, " + ", ".join(parts)


def recognise_preset(state: dict[str, torch.Tensor], path: Path | str = "state dict") -> Preset:
    """The preset in PRESETS whose architecture the keys describe (published files record none).

    A preset is recognised when at least 90% of its keys are present with its shapes, so that a damaged or
    edited file of a known configuration gets a precise error (check_state_dict) rather than "unknown".
    """
    shapes = {k: tuple(v.shape) for k, v in state.items()}

    def fit(preset: Preset) -> float:
        expected = expected_shapes(preset)
        return sum(shapes.get(k) == shape for k, shape in expected.items()) / len(expected)

    best = max(PRESETS.values(), key=fit)
    if fit(best) >= 0.9:
        return best
    known = "; ".join(f"{name}: {_describe(expected_shapes(p))}" for name, p in PRESETS.items())
    raise CheckpointError(
        f"checkpoint {path} holds an unknown configuration ({_describe(shapes)}); known presets: {known}. "
        "Checkpoints of other configurations must record their preset (save them with save_checkpoint)."
    )


def check_state_dict(state: dict[str, torch.Tensor], preset: Preset, may_miss=(), path="state dict") -> list[str]:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys; return the keys of `may_miss`
    that are absent (to be initialised)."""
    expected = expected_shapes(preset)
    missing = [k for k in expected if k not in state and k not in may_miss]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} (file {list(v.shape)}, model {list(expected[k])})"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    problems = [
        f"{len(keys)} {what}{'s' if len(keys) > 1 else ''}: {_listing(keys)}"
        for keys, what in ((missing, "missing key"), (unexpected, "unexpected key"), (wrong, "shape mismatch"))
        if keys
    ]
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit preset {preset.name!r}: " + "; ".join(problems))
    return [k for k in may_miss if k not in state]


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                    allow_unsafe_pickle: bool = True, detail_width: int = 0) -> Sam3D:
    """A Sam3D in eval mode from an own or published checkpoint file; CheckpointError if it cannot be.

    allow_unsafe_pickle: permit a full (code-running) unpickle of files holding objects beyond tensors and
    argparse.Namespace; with False such files raise CheckpointError.
    detail_width: give a model that has no detail encoder, or a narrower one, one of this width
    (`Preset.detail_width`), for fine-tuning; the model answers as the file does (a new encoder's output
    starts at zero, a widened one's new channels reach the output through zero weights), and the encoder's
    keys are listed in `initialised_keys` so that training can give them their own learning rate.
    """
    path = Path(path)
    state, preset, extra = _unpack(_read(path, allow_unsafe_pickle), path)
    own = preset is not None
    preset = preset or recognise_preset(state, path)
    may_miss = () if own else BOX_CORNER_KEYS
    narrower = 0 < preset.detail_width < detail_width
    if narrower:
        check_state_dict(state, preset, may_miss, path)
        kept = {k: state.pop(k) for k in list(state) if k.startswith(DETAIL_PREFIX)}
    if detail_width > preset.detail_width:
        preset = dataclasses.replace(preset, detail_width=detail_width)
        may_miss += tuple(k for k in expected_shapes(preset) if k.startswith(DETAIL_PREFIX))
    initialised = check_state_dict(state, preset, may_miss, path)
    # nn.Embedding's N(0, 1) init, seeded so that a published model answers box prompts reproducibly.
    generator = torch.Generator().manual_seed(0)
    shapes = expected_shapes(preset)
    state = {k: v.to(device=device, dtype=torch.float32, copy=True) for k, v in state.items()}
    state.update({k: torch.randn(shapes[k], generator=generator).to(device)
                  for k in initialised if k in BOX_CORNER_KEYS})
    if any(k.startswith(DETAIL_PREFIX) for k in initialised):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            fresh = detail_encoder(preset).state_dict()
        if narrower:
            fresh = _widened_detail_state({k.removeprefix(DETAIL_PREFIX): v for k, v in kept.items()}, fresh)
        state.update({DETAIL_PREFIX + k: v.to(device=device, dtype=torch.float32) for k, v in fresh.items()})
    with torch.device("meta"):
        model = Sam3D(preset)
    model.load_state_dict(state, assign=True)
    model.initialised_keys = tuple(initialised)
    model.checkpoint_metadata = extra
    if any(k in BOX_CORNER_KEYS for k in initialised):
        log.info("checkpoint %s has no %s (added by this project); initialised them: box prompts are "
                 "untrained for this model", path, ", ".join(k for k in initialised if k in BOX_CORNER_KEYS))
    log.info("loaded checkpoint %s as preset %r", path, preset.name)
    return model.eval()


def _widened_detail_state(kept: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A wider detail encoder's state that computes what the kept (narrower) one does. Each kept output channel
    keeps its weights and reads kept inputs only; the last convolution's outputs are all kept ones, so the new
    channels (freshly initialised) reach the decoder through zero weights until training moves them."""
    widened = {}
    for key, value in fresh.items():
        old, value = kept[key], value.clone()
        value[: old.shape[0]] = 0
        value[tuple(slice(0, n) for n in old.shape)] = old
        widened[key] = value
    return widened


def save_checkpoint(model: Sam3D, path: str | os.PathLike, **extra) -> Path:
    """Write an own-format checkpoint recording the model's preset; `extra` entries (epoch, metrics, model
    card fields ...) are stored alongside, best as plain Python values so that weights_only loading works.
    The file is written next to its destination and renamed, so a crash never leaves half a checkpoint."""
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"reserved checkpoint entries: {', '.join(clash)}")
    path = Path(path)
    state = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
        for k, v in model.state_dict().items()
    }
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "preset": model.preset.to_dict(),
              "model_state_dict": state, **extra}
    partial = path.with_name(path.name + ".partial")
    torch.save(record, partial)
    os.replace(partial, path)
    return path
