"""Ablation of the network's design choices on one stack and factor.

Each training variant is trained once; every inference variant is applied to
that one model, so inference-only levers cost no extra training. Prints a
Markdown table (IoU on reconstructed slices, times) and saves it as JSON.

    python ablation.py --input ../shared/data/urocell_fib1-4-3-0_mito.tif --factor 8
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from bench import load_inputs, parse_overrides
from data import UserError, downsample_z
from eval import default_settings
from metrics import score_reconstruction
from model import select_device
from morph import interpolate_along_axis, morph_stack_interpolated
from restore import restore_probabilities, threshold_probabilities
from settings import Settings

# name -> eval.py constants changed from the defaults
TRAINING_VARIANTS: Dict[str, Dict[str, str]] = {
    "default": {},
    "previous default budget (random crops, 5 epochs)": {"NUM_EPOCHS": "5", "CROP_POOL": "1"},
    "previous budget (64 px crops, 1600 x 10 epochs)": {"TRAIN_XY_SIZE": "64", "TRAIN_NB": "1600", "NUM_EPOCHS": "10",
                                                        "CROP_POOL": "1"},
    "fp32 training": {"PRECISION": "fp32"},
    "no input skip (draw from scratch)": {"INPUT_SKIP": "false"},
    "nearest-slice upscaling": {"UPSCALE_METHOD": "nearest"},
    "BCE + 0.5 Dice": {"DICE_WEIGHT": "0.5"},
    "half the training (TRAIN_NB 800)": {"TRAIN_NB": "800"},
    "wider (BASE_FILTERS 24)": {"BASE_FILTERS": "24"},
    "previous network (concatenated skips, shortcut BatchNorm)": {"SKIP_MERGE": "concat", "SHORTCUT_NORM": "true"},
    "concatenated skips (SKIP_MERGE concat)": {"SKIP_MERGE": "concat"},
    "shortcut BatchNorm (SHORTCUT_NORM true)": {"SHORTCUT_NORM": "true"},
}
INFERENCE_VARIANTS: Dict[str, Dict[str, str]] = {
    "default": {},
    "channels 1 voxel apart": {"CHANNEL_STRIDE": "1"},
    "one orientation (planes along Y)": {"ORIENTATIONS": "y"},
    "kept slices not copied": {"KEEP_KEPT_SLICES": "false"},
    "test-time flips (x4)": {"TTA_FLIPS": "true"},
    "fp32 inference (reference precision)": {"PRECISION": "fp32"},
    "every tile computed (no empty-tile skipping)": {"SKIP_EMPTY_TILES": "false"},
    "16 tiles per batch on the CPU (no pixel cap)": {"INFERENCE_BATCH_PIXELS": "0"},
    # The compiled network is cached per model: the second row shows the cost once compiled.
    "compiled network (COMPILE; time includes compiling)": {"COMPILE": "true"},
    "compiled network, run again (compilation cached)": {"COMPILE": "true"},
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, nargs="*", default=[], help="TIFF stack (default: built-in sample)")
    parser.add_argument("--factor", type=int, default=8)
    parser.add_argument("--training", nargs="*", choices=list(TRAINING_VARIANTS), default=list(TRAINING_VARIANTS))
    parser.add_argument("--inference", nargs="*", choices=list(INFERENCE_VARIANTS),
                        default=list(INFERENCE_VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="eval.py constants changed for every row (the rows' own changes go on top)")
    parser.add_argument("--out", type=Path, help="JSON file for the rows")
    args = parser.parse_args(argv)
    if args.out and args.out.exists():
        print(f"error: '{args.out}' already exists", file=sys.stderr)
        return 2
    try:  # a bad setting fails before any work
        base_settings = Settings.from_dict(parse_overrides(args.set, default_settings()))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    (name, truth, _labels), = load_inputs(args.input, quick=False, sample_shape=(128, 128, 128))
    sparse, kept = downsample_z(truth, args.factor)
    device = select_device()
    rows: List[dict] = []
    baselines = {"nearest": interpolate_along_axis(sparse, kept, truth.shape[0], method="nearest"),
                 "sdf": morph_stack_interpolated(sparse, kept, truth.shape[0], progress=False)}
    for label, restored in baselines.items():
        rows.append({"training": label, "inference": "", "iou_recon": score_reconstruction(restored, truth, kept)
                     ["iou_recon"], "train_s": None, "infer_s": None})
    print(f"{name} {truth.shape}, factor {args.factor}\n")
    print("| training | inference | IoU recon | train s | infer s | voxels changed vs default |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['training']} | | {row['iou_recon']:.4f} | | | |", flush=True)
    reference = None  # the default model's default inference: what the other variants are compared with
    for training in args.training:
        settings = base_settings.with_values(**TRAINING_VARIANTS[training])
        model, train_s = None, None
        for inference in (args.inference if training == "default" else ["default"]):
            variant = settings.with_values(**INFERENCE_VARIANTS[inference])
            # The first variant trains; the others reuse that model.
            probabilities, model, info = restore_probabilities(sparse, args.factor, variant, model,
                                                               original_depth=truth.shape[0], device=device,
                                                               progress=False)
            train_s = info["train_s"] if train_s is None else train_s
            infer_s = info["infer_s"]
            predicted = threshold_probabilities(probabilities, variant.inference.probability_threshold, in_place=True)
            iou = score_reconstruction(predicted, truth, kept)["iou_recon"]
            reference = predicted if reference is None else reference
            changed = int(np.count_nonzero(predicted != reference))
            rows.append({"training": training, "inference": inference, "iou_recon": iou, "train_s": train_s,
                         "infer_s": infer_s, "voxels_changed": changed, "fraction_changed": changed / predicted.size})
            print(f"| {training} | {inference} | {iou:.4f} | {train_s:.0f} | {infer_s:.1f} | "
                  f"{changed} ({changed / predicted.size:.2e}) |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"stack": name, "factor": args.factor, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
