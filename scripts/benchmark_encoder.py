"""Image-encoder speed on this machine: padded reference vs exact fast path (fp32) vs bf16, and bf16's error.

For each preset (random but non-trivial weights, one random crop): encoder seconds, cold first call and warm
median of 3, per path; speed-ups over the padded reference; max/mean |error| of the exact path against the
padded one and of bf16 against fp32 (embedding, and low-res logits + IoU after decoding a point prompt with the
float32 decoder); decoder time; for the small preset a training step. Ends with the peak RSS.

    .venv/bin/python scripts/benchmark_encoder.py [--threads 2] [--presets sam_med3d segany_pet_small]

Timings on a shared machine are only as good as its load: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import time

import torch
from torch import nn

from segany_pet.model import PRESETS, Sam3D, build_model
from segany_pet.model.layers import LayerNorm3d


def randomise(model: Sam3D, seed: int = 0) -> Sam3D:
    """Weights with the statistics that matter here: strong relative position bias, non-zero qkv biases (the
    padded tokens' keys and values), LayerNorm affine terms away from identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "rel_pos" in name else 0.2 if p.ndim == 1 or name.endswith("pos_embed") else (
                1.0 / math.sqrt(p[0].numel()) if p.shape[0] > 1 else 1.0)
            p.copy_(scale * torch.randn(p.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, nn.LayerNorm | LayerNorm3d):
                module.weight.add_(1.0)
    return model.eval()


def timed(fn, warm_runs: int = 3):
    """(result, cold seconds, warm median seconds)."""
    start = time.perf_counter()
    result = fn()
    cold = time.perf_counter() - start
    warm = []
    for _ in range(warm_runs):
        start = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - start)
    return result, cold, statistics.median(warm)


def error(got: torch.Tensor, reference: torch.Tensor) -> str:
    diff = (got.float() - reference).abs()
    return (f"max {diff.max():.2e} mean {diff.mean():.2e} (reference max |x| {reference.abs().max():.3f}, "
            f"mean |x| {reference.abs().mean():.3f}; mean rel {diff.mean() / reference.abs().mean():.2%})")


def benchmark(name: str) -> None:
    preset = PRESETS[name]
    model = randomise(build_model(preset))
    s = preset.crop_size
    image = torch.randn(1, 1, s, s, s, generator=torch.Generator().manual_seed(1))
    click = (torch.tensor([[[s / 2 - 3, s / 2 + 2, s / 2]]]), torch.tensor([[1]]))
    encoder = model.image_encoder
    print(f"\n== {name}: crop {s}^3 at {preset.spacing_mm} mm, {preset.embedding_grid}^3 tokens, "
          f"dim {preset.encoder_dim} x {preset.encoder_depth} blocks, window {preset.window_size or 'none'}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    results = {}
    with torch.inference_mode():
        for label, mode, dtype in (("padded fp32", "padded", "float32"), ("exact fp32", "exact", "float32"),
                                   ("exact bf16", "exact", "bfloat16")):
            encoder.attention_mode = mode
            model.to_inference_dtype(dtype)
            embedding, cold, warm = timed(lambda: encoder(image))  # noqa: B023 (called at once)
            logits, iou = model.decode(model.embed(image), click)  # with the detail encoder's features, if any
            results[label] = (embedding, logits, iou, cold, warm)
            print(f"{label:12s} encoder: cold {cold:7.3f} s, warm median of 3 {warm:7.3f} s")
        model.to_inference_dtype("float32")
        embedding = model.embed(image)
        _, _, decode = timed(lambda: model.decode(embedding, click))
    padded_warm, exact_warm, bf16_warm = (results[k][4] for k in ("padded fp32", "exact fp32", "exact bf16"))
    print(f"speed-up over padded (warm): exact fp32 {padded_warm / exact_warm:.1f}x, "
          f"bf16 {padded_warm / bf16_warm:.1f}x; bf16 over exact fp32 {exact_warm / bf16_warm:.2f}x")
    print(f"prompt encoder + decoder (fp32, warm): {decode:.3f} s; "
          f"exact fp32 encoder + decoder: {exact_warm + decode:.3f} s")
    for index, what in enumerate(("embedding", "low-res logits", "IoU")):
        print(f"exact vs padded {what:15s} {error(results['exact fp32'][index], results['padded fp32'][index])}")
    for index, what in enumerate(("embedding", "low-res logits", "IoU")):
        print(f"bf16 vs fp32    {what:15s} {error(results['exact bf16'][index], results['exact fp32'][index])}")
    agree = ((results["exact bf16"][1] > 0) == (results["exact fp32"][1] > 0)).float().mean()
    print(f"bf16 vs fp32 mask (logit > 0) voxel agreement: {agree:.4%}")
    if name != "sam_med3d":
        train_step(model, preset)


def train_step(model: Sam3D, preset) -> None:
    """Forward + backward + AdamW step on a batch of 2 with 3 clicks each (the training loop's unit)."""
    model.train()
    s = preset.crop_size
    images = torch.randn(2, 1, s, s, s)
    clicks = (torch.randint(0, s, (2, 3, 3)).float(), torch.ones(2, 3, dtype=torch.long))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimiser.zero_grad()
        logits, iou = model(images, points=clicks)
        (logits.sigmoid().mean() + iou.square().mean()).backward()
        optimiser.step()

    _, cold, warm = timed(step)
    print(f"training step (batch 2, forward + backward + AdamW): cold {cold:.3f} s, warm median of 3 {warm:.3f} s")
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.2f}")
    for name in args.presets:
        benchmark(name)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {peak:.0f} MB; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
