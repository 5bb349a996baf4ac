"""``gren lungs train``: train the lung U-Net on folders of images + 0/1/2 masks."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from gren.core.errors import GrenError

GROUP = "lungs"
NAME = "train"
HELP = "train the left/right lung U-Net on DIR/images + DIR/masks (0/1/2) folders"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", required=True, metavar="DIR",
                        help="folder with images/<stem>.* and masks/<stem>.png (repeatable)")
    parser.add_argument("--out", required=True, metavar="CKPT", help="checkpoint file to write (e.g. lungs.pt)")
    parser.add_argument("--size", type=int, default=256, help="network input side in pixels (default 256)")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (one-cycle)")
    parser.add_argument("--base-width", type=int, default=16, help="channels of the first U-Net level")
    parser.add_argument("--seed", type=int, default=0, help="seeds init, augmentation, sampling and folds")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    held = parser.add_mutually_exclusive_group()
    held.add_argument("--folds", type=int, help="cut the images into K folds and hold out --fold")
    held.add_argument("--holdout", metavar="LIST",
                      help="stems to hold out: comma-separated, or a file with one stem per line")
    parser.add_argument("--fold", type=int, default=0, help="the held-out fold with --folds (0..K-1)")


def run(args: argparse.Namespace) -> int:
    from gren.lungs.folder import find_samples, load_pairs
    from gren.lungs.tools import evaluate_samples, fold_split, parse_holdout
    from gren.lungs.unet import UNetSegmenter, save_checkpoint, train_unet

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    samples = []
    for data_dir in args.data:
        found = find_samples(data_dir, require_masks=True)
        log.info("%s: %d images with masks", data_dir, len(found))
        samples.extend(found)
    ids = [f"{s.image_path.parent}/{s.stem}" for s in samples]
    if len(set(ids)) != len(ids):
        raise GrenError("the same image is listed twice (a --data folder given twice?)")
    held_out: list = []
    if args.folds:
        train_ids, test_ids = fold_split(ids, args.folds, args.fold, args.seed)
        test_set = set(test_ids)
        held_out = [s for s, i in zip(samples, ids) if i in test_set]
        samples = [s for s, i in zip(samples, ids) if i not in test_set]
    elif args.holdout:
        stems = parse_holdout(args.holdout)
        unknown = stems - {s.stem for s in samples}
        if unknown:
            log.warning("--holdout: %d stems are not in the data: %s", len(unknown), ", ".join(sorted(unknown)[:5]))
        held_out = [s for s in samples if s.stem in stems]
        samples = [s for s in samples if s.stem not in stems]
    if not samples:
        raise GrenError("no training images left after holding out")
    log.info("training on %d images, holding out %d", len(samples), len(held_out))
    images, masks = load_pairs(samples)
    model, config = train_unet(images, masks, size=args.size, epochs=args.epochs, batch_size=args.batch_size,
                               lr=args.lr, base_width=args.base_width, seed=args.seed,
                               progress=not args.quiet)
    config["data"] = [str(Path(d)) for d in args.data]
    if held_out:
        result = evaluate_samples(UNetSegmenter(model, config), held_out, progress=not args.quiet)
        config["holdout"] = {"stems": [s.stem for s in held_out],
                             **{k: result[k] for k in ("n_images", "right_lung", "left_lung", "mean", "fallback")}}
        log.info("held-out Dice: right lung %.4f, left lung %.4f, mean %.4f (%d images, %d fallbacks)",
                 result["right_lung"], result["left_lung"], result["mean"], result["n_images"], result["fallback"])
    path = save_checkpoint(args.out, model, config)
    log.info("wrote %s", path)
    summary = {"checkpoint": str(path), "train_images": config["train_images"],
               "final_loss": round(config["loss_history"][-1], 5), "holdout": config.get("holdout")}
    if summary["holdout"]:
        summary["holdout"] = {k: v for k, v in summary["holdout"].items() if k != "stems"}
    print(json.dumps(summary))
    return 0
