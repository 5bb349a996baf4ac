"""Train the lung U-Net that ships in the package (``src/gren/lungs/weights/lungs-unet.pt``) and
cross-validate its recipe.

Data: the 90 real CC BY films with per-lung masks in ``../shared/data/lungs`` (see its README and
docs/lungs.md for the credit) plus ``--synth-n`` synthetic films from :func:`gren.data.synth.synthesize`
(NIH layout with lung masks, seeded), generated into ``--work``.

Parts (``--parts``, default ``cv,final``):

* ``cv``: K-fold cross-validation over the real films (:func:`gren.lungs.tools.fold_split`, the
  same seeded folds as ``bench_lungs.py``): each fold trains on the other folds' real films plus
  *all* synthetic films and is tested on its held-out real films. A fold's checkpoint is kept in
  ``--work`` and reused by a rerun with the same recipe (so the evaluation can be redone cheaply).
  Held-out films are scored with :class:`gren.lungs.unet.UNetSegmenter` as shipped (sanity checks
  and failure flags included) and, on the same films, the classical segmenter.
* ``final``: trains on all real + synthetic films and writes the shipped checkpoint with fp16
  weights (half the bytes; :func:`gren.lungs.unet.load_checkpoint` loads them into the float32 model,
  ``torch.load(weights_only=True)``).

Writes ``benchmarks/results/shipped_lungs.json`` and ``.md`` (machine, recipe, per-fold Dice, wall
times). Run it with ``nice``; one torch thread by default (on the 2 shared cores two threads were
about 4x slower per step than one, from contention).

    nice -n 10 python benchmarks/train_shipped_lungs.py                    # cv + final
    nice -n 10 python benchmarks/train_shipped_lungs.py --parts final
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import machine_info
from gren.core.paths import shared_data_dir
from gren.data.synth import synthesize
from gren.lungs.classical import ClassicalSegmenter
from gren.lungs.dice import lung_dice, summarize_dice
from gren.lungs.folder import find_samples, load_pairs
from gren.lungs.quality import FLAG_PREFIX
from gren.lungs.tools import fold_split
from gren.lungs.unet import UNetSegmenter, load_checkpoint, save_checkpoint, train_unet

log = logging.getLogger("train_shipped_lungs")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHIPPED = ROOT / "src" / "gren" / "lungs" / "weights" / "lungs-unet.pt"


def cpu_model() -> str:
    """CPU model name and its vector instruction-set flags (from /proc/cpuinfo)."""
    return f"{machine_info.cpu_model()} [{' '.join(machine_info.vector_flags()) or 'no avx flags'}]"


def recipe_of(args: argparse.Namespace) -> dict:
    return {"size": args.size, "epochs": args.epochs, "base_width": args.base_width, "batch_size": args.batch_size,
            "lr": args.lr, "seed": args.seed, "synth_n": args.synth_n, "synth_size": args.synth_size,
            "synth_seed": args.synth_seed}


def synthetic_pairs(work: Path, n: int, size: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` synthetic films with lung masks (uint8 (size, size) each), generated once into ``work``."""
    if n <= 0:
        return [], []
    folder = work / f"synth_n{n}_s{size}_seed{seed}"
    if not (folder / "synth.json").is_file() or json.loads((folder / "synth.json").read_text()).get("complete") is False:
        synthesize(folder, n, size=size, seed=seed, progress=False, force=True)
    return load_pairs(find_samples(folder, require_masks=True))


def half_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with floating tensors in float16 (what the shipped file stores)."""
    return {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}


def save_fp16(path: Path, model: torch.nn.Module, config: dict) -> Path:
    """:func:`save_checkpoint` with fp16 weights (``config["weights_dtype"] = "float16"``)."""
    halved = type(model)(base_width=int(config["base_width"]), levels=int(config["levels"]))
    halved.load_state_dict(model.state_dict())
    halved.half()
    return save_checkpoint(path, halved, {**config, "weights_dtype": "float16"})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def score(segmenter, images: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    """Dice, fallbacks and failure flags of ``segmenter`` on 512 px films (batched)."""
    batch, truth = np.stack(images), np.stack(masks)
    predicted, fallback, reasons = segmenter.segment(batch, return_reasons=True)
    dice = lung_dice(predicted, truth)
    return {"dice": dice, "fallback": np.asarray(fallback, bool),
            "flagged": np.array([r.startswith(FLAG_PREFIX) for r in reasons], bool)}


def run_cv(args, stems, images, masks, synth_images, synth_masks, work: Path) -> dict:
    recipe = recipe_of(args)
    folds = []
    all_unet, all_classical = np.zeros((len(stems), 2)), np.zeros((len(stems), 2))
    unet_fallback, classical_fallback = np.zeros(len(stems), bool), np.zeros(len(stems), bool)
    started = time.perf_counter()
    splits = []
    reused = 0
    for fold in range(args.folds):  # train every missing fold first, then evaluate them all
        train_stems, test_stems = fold_split(stems, args.folds, fold, args.seed)
        test_idx = [stems.index(s) for s in test_stems]
        train_idx = [stems.index(s) for s in train_stems]
        tag = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
        ckpt = work / f"cv{args.folds}_fold{fold}_{tag}.pt"
        splits.append((fold, train_idx, test_idx, ckpt))
        if ckpt.is_file():
            log.info("fold %d: reusing %s", fold, ckpt)
            reused += 1
            continue
        model, config = train_unet([images[i] for i in train_idx] + synth_images,
                                   [masks[i] for i in train_idx] + synth_masks, size=args.size,
                                   epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                   base_width=args.base_width, seed=args.seed, progress=False)
        config["recipe"] = recipe
        save_checkpoint(ckpt, model, config)
        log.info("fold %d: trained in %.0f s", fold, config["train_seconds"])
    for fold, train_idx, test_idx, ckpt in splits:
        model, config = load_checkpoint(ckpt)
        train_seconds = float(config["train_seconds"])
        unet = score(UNetSegmenter(model, config), [images[i] for i in test_idx], [masks[i] for i in test_idx])
        classical = score(ClassicalSegmenter(), [images[i] for i in test_idx], [masks[i] for i in test_idx])
        all_unet[test_idx], all_classical[test_idx] = unet["dice"], classical["dice"]
        unet_fallback[test_idx], classical_fallback[test_idx] = unet["fallback"], classical["fallback"]
        row = {"fold": fold, "train_real": len(train_idx), "train_synth": len(synth_images), "test": len(test_idx),
               "unet": {k: round(v, 4) for k, v in summarize_dice(unet["dice"]).items()},
               "unet_fallback": int(unet["fallback"].sum()), "unet_flagged": int(unet["flagged"].sum()),
               "classical": {k: round(v, 4) for k, v in summarize_dice(classical["dice"]).items()},
               "classical_fallback": int(classical["fallback"].sum()),
               "train_seconds": round(train_seconds, 1)}
        log.info("fold %d: U-Net %.4f (%d fallbacks), classical %.4f, %.0f s training", fold,
                 row["unet"]["mean"], row["unet_fallback"], row["classical"]["mean"], train_seconds)
        folds.append(row)
    fold_means = [f["unet"]["mean"] for f in folds]
    return {
        "folds": folds, "seconds": round(time.perf_counter() - started, 1), "folds_reused": reused,
        "unet_flagged": int(sum(f["unet_flagged"] for f in folds)),
        "unet": {k: round(v, 4) for k, v in summarize_dice(all_unet).items()},
        "unet_fallback": int(unet_fallback.sum()),
        "unet_fold_std": round(float(np.std(fold_means)), 4),
        "classical": {k: round(v, 4) for k, v in summarize_dice(all_classical).items()},
        "classical_fallback": int(classical_fallback.sum()),
        "per_film": [{"stem": s, "unet": round(float(u.mean()), 4), "classical": round(float(c.mean()), 4)}
                     for s, u, c in zip(stems, all_unet, all_classical)],
    }


def run_final(args, images, masks, synth_images, synth_masks) -> dict:
    started = time.perf_counter()
    model, config = train_unet(images + synth_images, masks + synth_masks, size=args.size, epochs=args.epochs,
                               batch_size=args.batch_size, lr=args.lr, base_width=args.base_width,
                               seed=args.seed, progress=False)
    config["recipe"] = recipe_of(args)
    config["data"] = ["shared/data/lungs (90 real CC BY films)",
                      f"gren data synth --n {args.synth_n} --size {args.synth_size} --seed {args.synth_seed}"]
    config["made_by"] = "benchmarks/train_shipped_lungs.py"
    out = Path(args.out)
    save_fp16(out, model, config)
    return {"path": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out), "bytes": out.stat().st_size,
            "sha256": sha256(out), "train_images": config["train_images"],
            "final_loss": round(config["loss_history"][-1], 5), "seconds": round(time.perf_counter() - started, 1)}


def write_markdown(result: dict, path: Path) -> None:
    r = result["recipe"]
    lines = [
        "# The shipped lung U-Net (`benchmarks/train_shipped_lungs.py`)", "",
        f"Machine: {result['machine']}; {result['threads']} torch thread(s); {result['date']}.", "",
        f"Recipe: `LungUNet` base width {r['base_width']}, {r['size']} px, {r['epochs']} epochs, batch "
        f"{r['batch_size']}, peak lr {r['lr']}, seed {r['seed']}; training films: the real films of the "
        f"training folds (all 90 for the shipped model) + {r['synth_n']} synthetic films "
        f"(`gren data synth --n {r['synth_n']} --size {r['synth_size']} --seed {r['synth_seed']}`).", "",
    ]
    cv = result.get("cv")
    if cv:
        lines += [
            f"## {len(cv['folds'])}-fold cross-validation over the {sum(f['test'] for f in cv['folds'])} real films", "",
            "Synthetic films always in training; each real film tested once, by the fold that did not train on it. "
            "Mean Dice = mean over films of the two lungs' mean, at 512 px; the U-Net as shipped "
            "(failure flags and fallbacks included).", "",
            "| fold | train (real + synth) | test | U-Net right (1) | U-Net left (2) | U-Net mean | U-Net fallbacks "
            "| classical mean | training s |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for f in cv["folds"]:
            lines.append(f"| {f['fold']} | {f['train_real']} + {f['train_synth']} | {f['test']} | "
                         f"{f['unet']['right_lung']:.4f} | {f['unet']['left_lung']:.4f} | {f['unet']['mean']:.4f} | "
                         f"{f['unet_fallback']} | {f['classical']['mean']:.4f} | {f['train_seconds']:.0f} |")
        lines += [f"| all | | {len(cv['per_film'])} | {cv['unet']['right_lung']:.4f} | {cv['unet']['left_lung']:.4f} | "
                  f"**{cv['unet']['mean']:.4f}** | {cv['unet_fallback']} | {cv['classical']['mean']:.4f} | |", "",
                  f"U-Net fold means: std {cv['unet_fold_std']:.4f}. Out-of-fold U-Net masks flagged as gross "
                  f"failures: {cv.get('unet_flagged', 0)} of {len(cv['per_film'])}. Wall time of this run: "
                  f"{cv['seconds'] / 60:.1f} min ({cv.get('folds_reused', 0)} of {len(cv['folds'])} folds reused "
                  "from their checkpoints in --work; training times per fold as recorded in them).", ""]
    final = result.get("final")
    if final:
        lines += ["## Shipped model", "",
                  f"`{final['path']}`: {final['bytes'] / 1e6:.2f} MB (fp16 weights), sha256 `{final['sha256']}`, "
                  f"{final['train_images']} training films, final loss {final['final_loss']}, "
                  f"{final['seconds'] / 60:.1f} min of wall time.", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="real films (default ../shared/data/lungs)")
    parser.add_argument("--parts", default="cv,final", help="comma-separated: cv, final")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "gren-shipped-lungs",
                        help="synthetic films and fold checkpoints (outside the repository)")
    parser.add_argument("--out", type=Path, default=SHIPPED, help="the shipped checkpoint to write")
    parser.add_argument("--results", type=Path, default=RESULTS / "shipped_lungs")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--base-width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synth-n", type=int, default=40)
    parser.add_argument("--synth-size", type=int, default=256)
    parser.add_argument("--synth-seed", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    data = args.data or shared_data_dir() / "lungs"
    samples = find_samples(data, require_masks=True)
    stems = [s.stem for s in samples]
    images, masks = load_pairs(samples)
    args.work.mkdir(parents=True, exist_ok=True)
    synth_images, synth_masks = synthetic_pairs(args.work, args.synth_n, args.synth_size, args.synth_seed)
    log.info("%d real films, %d synthetic films", len(images), len(synth_images))

    json_path = args.results.with_suffix(".json")
    result = json.loads(json_path.read_text()) if json_path.is_file() else {}
    result.update({"machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}",
                   "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
                   "threads": args.threads, "date": datetime.date.today().isoformat(), "recipe": recipe_of(args)})
    if "cv" in parts:
        result["cv"] = run_cv(args, stems, images, masks, synth_images, synth_masks, args.work)
    if "final" in parts:
        result["final"] = run_final(args, images, masks, synth_images, synth_masks)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, args.results.with_suffix(".md"))
    log.info("wrote %s and %s", json_path, args.results.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
