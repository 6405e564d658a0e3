"""flops: what FLUX.1-dev costs per training sample and per denoising step, what a device of a
given peak would do with it, what the reference's published figures imply, and a check of our
count against torch.utils.flop_counter. Pure arithmetic plus a few counted forwards: seconds."""

from __future__ import annotations

import torch

from fluxkit.shared import flops
from fluxkit.tiny.build import PRESETS

RESOLUTIONS = (256, 512, 1024)
T5_LENGTHS = (77, 512)  # the DreamBooth scripts' default, and FluxPipeline's
TOLERANCE = 0.05

# The reference's published figures (8 cards): full fine-tune at 256x256, batch 16, with the
# DreamBooth default T5 length; inference at FluxPipeline's defaults (1024x1024, T5 512).
REFERENCE_TRAIN_IMAGES_PER_SEC = 55.23
REFERENCE_CARDS = 8
REFERENCE_INFER_ITS = (1.16, 1.82)


def _dev_config() -> dict:
    return PRESETS["dev"].transformer


def _cost_rows(peaks_tflops: list[float]) -> list[dict]:
    cfg = _dev_config()
    rows = []
    for res in RESOLUTIONS:
        for t5 in T5_LENGTHS:
            tokens = flops.image_tokens(res, res)
            step = flops.flux_forward_flops(cfg, tokens, t5)
            full = flops.training_step_flops(cfg, tokens, t5)
            lora = flops.training_step_flops(cfg, tokens, t5, frozen_base=True)
            metrics = {"TFLOP/denoise step": step / 1e12, "TFLOP/train sample (full)": full / 1e12,
                       "TFLOP/train sample (LoRA)": lora / 1e12}
            for peak in peaks_tflops:
                for util in (1.0, 0.5):
                    metrics[f"full img/s @{peak:g}T {util:.0%}"] = peak * 1e12 * util / full
                    metrics[f"denoise it/s @{peak:g}T {util:.0%}"] = peak * 1e12 * util / step
            rows.append({"table": "FLUX.1-dev cost", "case": f"{res}x{res}", "params": {"T5 tokens": t5, "image tokens": tokens},
                         "metrics": metrics})
    return rows


def _reference_rows() -> tuple[list[dict], list[str]]:
    cfg = _dev_config()
    per_card = REFERENCE_TRAIN_IMAGES_PER_SEC / REFERENCE_CARDS
    sample = flops.training_step_flops(cfg, flops.image_tokens(256, 256), 77)
    rows = [{"table": "the reference's published figures by our count", "case": "full fine-tune 256x256 bs16, 8 cards", "params": {"T5 tokens": 77, "image tokens": 256},
             "metrics": {"published": f"{REFERENCE_TRAIN_IMAGES_PER_SEC} img/s", "per card": per_card,
                         "implied TFLOP/s per card": per_card * sample / 1e12}}]
    step = flops.flux_forward_flops(cfg, flops.image_tokens(1024, 1024), 512)
    for its in REFERENCE_INFER_ITS:
        rows.append({"table": "the reference's published figures by our count", "case": "inference 1024x1024", "params": {"T5 tokens": 512, "image tokens": 4096},
                     "metrics": {"published": f"{its} it/s", "per card": its, "implied TFLOP/s per card": its * step / 1e12}})
    notes = ["reference: its FPS multiplies per-card tqdm it/s by 8 and ignores gradient accumulation; "
             "the implied figures take the published numbers at face value",
             "reference inference assumed at FluxPipeline's defaults (1024x1024, T5 512 tokens, one transformer "
             "forward per step: FLUX.1-dev is guidance-distilled, no CFG batch)"]
    return rows, notes


def _check_rows() -> tuple[list[dict], bool]:
    """Our count vs torch's counter: real tiny/small weights on CPU, FLUX.1-dev on the meta
    device (shapes only: torch counts the same matmuls without computing them)."""
    from diffusers import FluxTransformer2DModel

    rows, ok = [], True
    for preset, device, shapes in (("tiny", "cpu", (64, 16, 2)), ("small", "cpu", (256, 77, 2)), ("dev", "meta", (256, 77, 1))):
        torch.manual_seed(0)
        with torch.device(device):
            model = FluxTransformer2DModel(**PRESETS[preset].transformer)
        tokens, text, batch = shapes
        forward = flops.torch_counted_flops(model, tokens, text, batch)
        ours = flops.flux_forward_flops(model.config, tokens, text, batch)
        train = flops.torch_counted_flops(model, tokens, text, batch, backward=True)
        ours_train = flops.training_step_flops(model.config, tokens, text, batch)
        metrics = {"torch counted forward": forward, "ours forward": ours, "forward diff %": 100 * (ours / forward - 1),
                   "torch counted train": train, "ours train": ours_train, "train diff %": 100 * (ours_train / train - 1)}
        good = all(abs(v) <= 100 * TOLERANCE for k, v in metrics.items() if k.endswith("diff %"))
        ok &= good
        metrics["within 5%"] = "yes" if good else "NO"
        rows.append({"table": "our count vs torch.utils.flop_counter", "case": f"{preset} ({device})", "params": {"image tokens": tokens, "T5 tokens": text, "batch": batch},
                     "metrics": metrics})
    return rows, ok


def run(ctx) -> dict:
    peaks = ctx.args.peak_tflops or [989.0]
    rows = _cost_rows(peaks)
    ref_rows, notes = _reference_rows()
    check_rows, ok = _check_rows()
    notes = [f"device peaks given with --peak_tflops (TFLOP/s, dense bf16): {', '.join(f'{p:g}' for p in peaks)}; "
             "989 is H100/H200 SXM's datasheet figure",
             "training FLOPs: forward + backward (3x forward; LoRA: base matmuls 2x, attention 3x); "
             "gradient-checkpointing recomputation, text encoders and VAE not counted", *notes]
    result = {"status": "ok" if ok else "failed", "rows": rows + ref_rows + check_rows, "notes": notes}
    if not ok:
        result["reason"] = "our FLOP count is more than 5% off torch's counter; see the check rows"
    return result
