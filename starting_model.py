"""The network a mask training starts from: trained once on built-in phantoms, fine-tuned on each stack.

Training from random weights spends its first epochs learning what every mask stack shares (edges,
smooth surfaces, how a blob narrows between two kept slices, where a thin sheet runs between them). A
network that has learnt that on synthetic phantoms needs fewer steps on the user's stack to reach the
same quality, which matters on CPUs without bfloat16 hardware (docs/speed-by-machine.md). The phantoms
are of three kinds (:data:`PHANTOMS`): compact objects, thin sheets, and the boundary masks of dense
label images, which the network restores for a dense label image (``morph.label_boundaries``). Their
seeds are not the seeds ``eval.py`` or the benchmarks evaluate on, so no evaluation sees its own test
volume in the prior.

The starting model is shipped in ``models/`` and rebuilt, bit for bit on the same CPU, by::

    python starting_model.py --output models/phantom-mask.pt --overwrite

It serves masks and label images (their foreground) with the default architecture; grey-scale stacks,
other architectures and other channel counts train from random weights (the plan says which).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from data import downsample_z, make_sample_stack
from model import STARTING_MODEL_PATH, AttentionResUNet, save_model
from morph import label_boundaries
from phantoms import make_sheet_labels, make_tissue_labels

# The prior's phantoms, by kind, in the order their crops are drawn. Seeds are never 0, 1 (bench.py), 7 or 42
# (eval.py's RANDOM_STATE and the seed checks). 'objects' alone was the prior until 2026-11-30: sheets and
# boundaries were added because the network learns thin structure slowly on a user's stack
# (docs/benchmarks.md, "A starting model that has seen sheets").
PHANTOMS = {
    "objects": (101, 102, 103, 104),  # tubes and ellipsoids (data.make_sample_stack)
    "sheets": (201, 202, 203, 204),  # membranes and bent discs, alone and stacked (phantoms.make_sheet_labels)
    "boundaries": (301, 302, 303, 304),  # dense label images' boundary masks (phantoms.make_tissue_labels)
}
# Cells per boundary phantom, and whether their ids are separated by 0: tissues with and without drawn boundaries.
TISSUE_CELLS = {301: (120, True), 302: (250, False), 303: (400, True), 304: (200, False)}
PHANTOM_SEEDS = tuple(seed for seeds in PHANTOMS.values() for seed in seeds)
# Z/XY factors the prior is trained at, mixed: one starting point for every factor a user has.
PHANTOM_FACTORS = (2, 4, 8)
PHANTOM_SHAPE = (128, 128, 128)


def phantom_mask(seed: int, shape: Tuple[int, int, int] = PHANTOM_SHAPE) -> np.ndarray:
    """The prior's phantom of ``seed`` (a seed of :data:`PHANTOMS`): a bool ``(D, H, W)`` mask, the boundary
    mask of a tissue label image for the 'boundaries' seeds (whose crops teach what a dense label image's
    restore asks)."""
    if seed in PHANTOMS["sheets"]:
        return make_sheet_labels(shape, seed=seed) > 0
    if seed in PHANTOMS["boundaries"]:
        n_cells, membrane = TISSUE_CELLS[seed]
        return label_boundaries(make_tissue_labels(shape, seed=seed, n_cells=n_cells, membrane=membrane))
    return make_sample_stack(shape, seed=seed)


def build_starting_model(seeds: Sequence[int] = PHANTOM_SEEDS, factors: Sequence[int] = PHANTOM_FACTORS,
                         shape: Tuple[int, int, int] = PHANTOM_SHAPE, crops_per_volume: int = 180,
                         num_epochs: int = 4, learning_rate: float = 3e-3, random_state: int = 0,
                         recipe: Optional[Dict[str, Any]] = None, device: Optional[torch.device] = None,
                         progress: bool = True) -> Tuple[AttentionResUNet, Dict[str, Any]]:
    """Train the starting model on phantom masks, each kept at every ``factor``-th Z slice.

    Parameters
    ----------
    seeds : phantom seeds (:func:`phantom_mask`; any other seed is an objects phantom)
    factors : Z/XY factors; every phantom is thinned at each of them and the crops pooled
    shape : (D, H, W) of each phantom
    crops_per_volume : training crops per (seed, factor) pair
    num_epochs, learning_rate, random_state : the training schedule and its seed
    recipe : dict, optional
        The mask recipe (``restore.training_kwargs(settings, 'mask')``) for crop size, channels, batch size,
        architecture and crop selection; default: the command line's.

    Returns
    -------
    model : AttentionResUNet in eval mode
    config : dict recorded with the model (seeds, factors, schedule)
    """
    import train
    from restore import training_kwargs

    if recipe is None:
        import eval as defaults  # eval.py's constants: the settings model's defaults, as a user edited them
        recipe = training_kwargs(defaults.default_recipe(), "mask")
    train.seed_everything(random_state)
    crop = (recipe["train_z_size"], recipe["train_xy_size"], recipe["train_xy_size"])
    inputs, labels = [], []
    for seed in seeds:
        phantom = phantom_mask(seed, tuple(shape))
        for factor in factors:
            sparse, _ = downsample_z(phantom, factor)
            x, y = train.create_cropped_image_dataset(
                sparse, crop, crops_per_volume, factor, recipe["min_content_ratio"], random_state + seed * 100 + factor,
                recipe["upscale_method"], "mask", 0.0, recipe["lateral_axes"], recipe["crop_pool"])
            inputs.append(x)
            labels.append(y)
    train_loader, val_loader = train.make_loaders(np.concatenate(inputs), np.concatenate(labels),
                                                  recipe["val_split"], recipe["batch_size"], random_state)
    model = AttentionResUNet(in_channels=recipe["train_z_size"], n_classes=1, depth=recipe["depth"],
                             base_filters=recipe["base_filters"], dropout_rate=recipe["dropout_rate"],
                             input_skip=recipe["input_skip"], skip_merge=recipe["skip_merge"],
                             shortcut_norm=recipe["shortcut_norm"])
    model, history = train.train_execution_process(model, train_loader, val_loader, num_epochs, learning_rate, device,
                                                   progress=progress, precision="fp32")
    config = {"STARTING_MODEL": {"phantom_seeds": list(seeds), "factors": list(factors), "shape": list(shape),
                                 "crops_per_volume": crops_per_volume, "num_epochs": num_epochs,
                                 "learning_rate": learning_rate, "random_state": random_state,
                                 "val_loss": history["val"]},
              "TRAIN_XY_SIZE": recipe["train_xy_size"], "TRAIN_Z_SIZE": recipe["train_z_size"],
              "UPSCALE_METHOD": recipe["upscale_method"]}
    return model, config


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the phantom-trained starting model of mask trainings.")
    parser.add_argument("--output", type=Path, default=STARTING_MODEL_PATH, help="model file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, config = build_starting_model()
    save_model(args.output, model, config, overwrite=args.overwrite)
    print(f"Starting model written to {args.output} (validation loss per epoch: "
          f"{', '.join(f'{v:.4f}' for v in config['STARTING_MODEL']['val_loss'])})")


if __name__ == "__main__":
    main()
