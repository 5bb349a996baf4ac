"""The training engine behind ``gren train``: data, loop, checkpoints, resume, DDP.

``train(data, method, out, ...)`` is the command's whole job: resolve the config, open the prepared
data and select the fold, then :func:`fit`. :func:`fit` is the loop on any :class:`TrainingData`
(tests pass small in-memory datasets).

The engine knows methods only through :mod:`gren.methods.protocol`: it builds the method, checks its
``needs`` against what the data provides before step 1, runs its ``stages()`` (each with its own epochs
and optimizer settings over the method's ``param_groups``), samples with the method's ``batch_sampler``
(or the mixed annotated / label-only default), applies its ``item_transform``, calls ``method(batch)``
-- the whole step's losses -- inside DDP and autocast, calls its ``on_stage_start`` / ``on_step_end``
hooks and saves its ``extra_state`` in the checkpoint.

Run directory (docs/architecture.md, "Runs"): ``config.yaml`` (resolved), ``split.csv`` (the fold),
``checkpoints/last.pt`` (everything a resume needs) and ``epoch_NNN.pt`` (the weights alone; the newest
``train.keep_epochs`` are kept, 2 by default) after every epoch (NNN counts epochs over all stages),
``metrics.jsonl`` (one JSON line per epoch: ``epoch, stage, stage_epoch, steps, images, time_s,
images_per_s, lr, loss{total, <the method's parts>}``) and ``tb/`` (TensorBoard: step and epoch scalars).

Determinism: ``seed`` fixes the initialisation (``torch.manual_seed`` before the model is built),
the batches (:class:`~gren.train.sampler.MixedBatchSampler`, a function of ``(seed, epoch)``) and
the DataLoader workers' seeds (a generator seeded per epoch). ``--resume`` restores the model,
optimizer, scheduler, method and RNG states saved after the last completed epoch and continues at
that stage and epoch, so a resumed run ends with the same weights as an uninterrupted one (bit for
bit on CPU).

CUDA: bf16 autocast (``device.amp``), channels_last, optional ``torch.compile``. Under ``torchrun``
each process trains ``train.batch_size`` images per step on its shard of the batches, gradients
averaged by DDP; see :mod:`gren.methods.gren` for ``graph.inter_scope``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gren.core import dist
from gren.core.atomic import write_text_atomic
from gren.core.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from gren.core.device import move_to, select_device
from gren.core.errors import GrenError
from gren.core.outputs import RUN_MARKER, RunLock, check_run_folder, write_run_marker
from gren.core.progress import progress
from gren.methods import Method, Stage, TrainContext, build_method, method_class
from gren.methods.protocol import deep_update
from gren.train.config import (
    check_value,
    default_config,
    load_yaml,
    resolve_config,
    save_config,
    validate_config,
)
from gren.train.sampler import MixedBatchSampler

log = logging.getLogger(__name__)

# Keys that may change when a run is resumed (they do not change what is computed).
RESUMABLE_CHANGES = ("train.epochs", "train.log_every", "train.keep_epochs", "data.workers", "device.device", "data.path")


@dataclass
class TrainingData:
    """What :func:`fit` trains on: a dataset of item dicts and the indices of its two pools."""

    dataset: Dataset
    annotated: Sequence[int]
    unannotated: Sequence[int]
    collate_fn: Callable | None = None  # default: gren.data.dataset.collate
    provides: frozenset[str] | None = None  # the item keys; None: read from the first item
    source: str = "the training data"  # named in messages
    validation: Dataset | None = None  # held-out annotated items scored during training (gren.train.validation)

    def item_keys(self) -> frozenset[str]:
        """The keys every item of :attr:`dataset` has."""
        if self.provides is not None:
            return frozenset(self.provides)
        provides = getattr(self.dataset, "provides", None)
        if provides is not None:
            return frozenset(provides)
        return frozenset(self.dataset[0]) if len(self.dataset) else frozenset()


class _TransformedDataset(Dataset):
    """``dataset`` with a method's per-item transform applied to each item."""

    def __init__(self, dataset: Dataset, transform: Callable[[dict], dict]):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.transform(self.dataset[index])


def open_training_data(data_path: str | os.PathLike, config: dict, run_dir: Path,
                       resume: bool = False) -> TrainingData:
    """Open ``data_path`` (cache or raw folder), select the fold, write ``run_dir/split.csv``.

    A resumed run (``resume``) reads its ``split.csv`` back, so it trains on the images it started
    with even if the folder gained images since. A fresh run always computes the fold from the config
    (deterministic, so every DDP rank computes the same one) and replaces any ``split.csv`` left by an
    earlier failed start.

    ``data.augment: true`` serves the training images through :class:`~gren.data.cache.LungSafeAugment`
    (crop-and-rescale, brightness / contrast, never flips; the validation images are never augmented).
    ``validation.fraction > 0`` carves the validation images from the fold's annotated training images
    (:func:`gren.train.validation.carve_validation`; ``split.csv`` keeps their ``train`` role, so the test
    fold is untouched, and ``run_dir/validation.csv`` lists them).
    """
    from gren.data.cache import CacheDataset, LungSafeAugment
    from gren.data.source import open_prepared
    from gren.data.splits import make_folds, read_fold_csv, write_fold_csv

    data_cfg = config["data"]
    from gren.data.fields import ensure_fields

    cache = open_prepared(data_path, size=int(data_cfg["size"]), lungs=data_cfg["lungs"])
    cache = ensure_fields(cache, method_class(config["method"]).needs)  # a method's declared per-image fields
    split_path = run_dir / "split.csv"
    if resume and split_path.is_file():
        split = read_fold_csv(split_path)
        log.info("fold read back from %s", split_path)
    else:
        n_folds, fold = int(data_cfg["folds"]), int(data_cfg["fold"])
        if not 0 <= fold < n_folds:
            raise GrenError(f"fold {fold} out of range: data.folds is {n_folds} (folds 0..{n_folds - 1})")
        folds = make_folds(cache.records, protocol=str(data_cfg["protocol"]), folds=n_folds, seed=int(config["seed"]),
                           split_by=data_cfg["split_by"])
        split = folds[fold]
        if dist.is_main_process():
            write_fold_csv(split, split_path)
    train_rows = split[split["role"] == "train"]
    if len(train_rows) == 0:
        raise GrenError(f"protocol {data_cfg['protocol']} fold {data_cfg['fold']}: no training images in {data_path}")
    from gren.train.validation import VALIDATION_CSV, carve_validation

    fraction = float(config.get("validation", {}).get("fraction", 0.0) or 0.0)
    train_rows, validation_rows = carve_validation(train_rows, fraction, int(config["seed"]), data_cfg["split_by"])
    validation = None
    if len(validation_rows):
        validation = CacheDataset(cache, indices=validation_rows["image_id"].astype(str).tolist())
        if dist.is_main_process():
            write_text_atomic(run_dir / VALIDATION_CSV,
                              validation_rows[["image_id", "patient_id"]].to_csv(index=False))
        log.info("validation: %d annotated images of %d %s held out of the training fold", len(validation_rows),
                 validation_rows["patient_id" if data_cfg["split_by"] == "patient" else "image_id"].nunique(),
                 "patients" if data_cfg["split_by"] == "patient" else "images")
    augment = data_cfg.get("augment", False)
    if not isinstance(augment, bool):
        raise GrenError(f"data.augment must be true or false, got {augment!r}")
    dataset = CacheDataset(cache, indices=train_rows["image_id"].astype(str).tolist(),
                           augment=LungSafeAugment() if augment else False)
    if augment:
        log.info("data.augment: lung-safe crop-and-rescale and brightness/contrast on the training images")
    annotated_flags = train_rows["annotated"].astype(bool).to_numpy()
    annotated = np.flatnonzero(annotated_flags).tolist()
    unannotated = np.flatnonzero(~annotated_flags).tolist()
    log.info("training on %d images: %d annotated (boxes), %d label-only", len(train_rows), len(annotated),
             len(unannotated))
    return TrainingData(dataset, annotated, unannotated, source=str(cache.path), validation=validation)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def _read_history(path: Path, upto_epoch: int) -> list[dict]:
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line.get("epoch", 0) <= upto_epoch]


def _write_history(path: Path, history: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(line) + "\n" for line in history))


def check_needs(method: Method, data: TrainingData) -> None:
    """Fail before step 1 when the data lacks a batch key the method reads (naming it and what to do)."""
    missing = sorted(set(method.needs) - data.item_keys())
    if missing:
        raise GrenError(f"method {method.name!r} needs {', '.join(missing)} in each batch, which {data.source} "
                        f"does not provide; prepare the data with `gren prepare` (a cache holds images, labels, "
                        f"boxes, lung masks and lung hashes) or choose another method")


def _stage_position(stages: list[Stage], completed: int) -> tuple[int, int]:
    """``(stage index, completed epochs in it)`` after ``completed`` epochs over all stages."""
    for index, stage in enumerate(stages):
        if completed < stage.epochs:
            return index, completed
        completed -= stage.epochs
    return len(stages), 0


def _check_finite_parameters(method: torch.nn.Module, where: str) -> None:
    bad = [name for name, p in method.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
    if bad:
        raise GrenError(f"{where}: {len(bad)} parameter tensors are not finite (e.g. {', '.join(bad[:3])}); "
                        "nothing was saved for this epoch; lower optim.lr or check the data")


def fit(config: dict, run_dir: str | os.PathLike, data: TrainingData, resume: bool = False) -> list[dict]:
    """Train ``config["method"]`` on ``data`` into ``run_dir``; returns the per-epoch metrics (all epochs).

    With ``resume`` the run continues from ``run_dir/checkpoints/last.pt`` (from scratch when there is none).
    Works in one process (CPU or GPU) and under ``torchrun`` (DDP).

    With ``data.validation`` (a dataset of annotated items) the model is scored on it every
    ``validation.every`` epochs and after the last one, on rank 0 (:func:`gren.train.validation.validate`);
    the epoch's line gains ``"validation"`` and TensorBoard ``validation/*`` scalars. ``validation.select``
    also keeps ``checkpoints/best.pt`` (weights, like ``epoch_NNN.pt``, plus ``validation``) by
    ``validation.metric``; nothing else depends on the validation score. TensorBoard also gets the run's
    hyperparameters (the HParams plugin, in ``tb/`` itself) and the resolved config as text.
    """
    run_dir = Path(run_dir)
    distributed = dist.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    main = rank == 0
    device = select_device(config["device"]["device"])
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not config["device"]["deterministic"]
        if config["device"]["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
    amp = on_cuda and config["device"]["amp"] == "bf16"
    channels_last = on_cuda and bool(config["device"]["channels_last"])
    train_cfg, optim_cfg = config["train"], config["optim"]
    keep_epochs = train_cfg.get("keep_epochs")
    if keep_epochs is not None and int(keep_epochs) < 0:
        raise GrenError(f"train.keep_epochs must be null (keep all) or >= 0, got {keep_epochs}")

    torch.manual_seed(int(config["seed"]))
    method = build_method(config["method"], config).to(device)
    check_needs(method, data)
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    stages = method.stages(config)
    if not stages or any(int(stage.epochs) < 0 for stage in stages):
        raise GrenError(f"method {method.name!r}: stages() must give at least one stage with epochs >= 0")
    total_epochs = sum(int(stage.epochs) for stage in stages)
    val_cfg = validation_settings(config, data)
    checkpoint_dir = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    start_epoch = 0
    last = checkpoint_dir / "last.pt"
    checkpoint = None
    if resume and last.is_file():
        checkpoint = load_checkpoint(last, map_location=device)
        method.load_state_dict(checkpoint["model"])
        method.load_extra_state(checkpoint.get("method_state") or {})
        set_rng_state(checkpoint["rng"])
        start_epoch = int(checkpoint["epoch"])
        log.info("resuming %s after epoch %d of %d", run_dir, start_epoch, total_epochs)
    elif resume:
        log.warning("%s: nothing to resume (no %s); starting from the beginning", run_dir, last)
    history = _read_history(metrics_path, start_epoch) if main else []
    best = _best_so_far(history, val_cfg)

    model: torch.nn.Module = method
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(method, device_ids=[device.index] if on_cuda else None)
    if config["device"]["compile"]:
        model = torch.compile(model)

    seed = int(config["seed"])
    sampler = method.batch_sampler(data, config, seed=seed, rank=rank, world_size=world)
    if sampler is None:
        sampler = MixedBatchSampler(data.annotated, data.unannotated, int(train_cfg["batch_size"]),
                                    config["data"]["annotated_fraction"], seed=seed, rank=rank,
                                    world_size=world, max_batches=train_cfg["max_steps_per_epoch"])
    collate_fn = data.collate_fn
    if collate_fn is None:
        from gren.data.dataset import collate as collate_fn
    transform = method.item_transform(config)
    dataset = data.dataset if transform is None else _TransformedDataset(data.dataset, transform)
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch * len(sampler) if resume else None)
        if start_epoch == 0:
            write_hparams(writer, config, validated=val_cfg is not None)
    stage_index, stage_epoch = _stage_position(stages, start_epoch)
    epoch = start_epoch
    try:
        while stage_index < len(stages):
            stage = stages[stage_index]
            stage_optim = deep_update(optim_cfg, stage.optim)
            optimizer = build_optimizer(method.param_groups(stage_optim), stage_optim)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(stage_optim["step_epochs"]),
                                                        gamma=float(stage_optim["gamma"]))
            resumed_here = checkpoint is not None and int(checkpoint.get("stage", 0)) == stage_index and stage_epoch > 0
            if resumed_here:
                optimizer.load_state_dict(checkpoint["optimizer"])
                scheduler.load_state_dict(checkpoint["scheduler"])
            context = TrainContext(config=config, device=device, stage=stage, stage_index=stage_index,
                                   epoch=stage_epoch, global_step=epoch * len(sampler), data=data, optimizer=optimizer)
            method.on_stage_start(stage, context)
            if len(stages) > 1:
                log.info("stage %d/%d %r: epochs %d-%d", stage_index + 1, len(stages), stage.name, epoch + 1,
                         epoch + stage.epochs - stage_epoch)
            while stage_epoch < stage.epochs:
                sampler.set_epoch(epoch)
                loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                    num_workers=int(config["data"]["workers"]), worker_init_fn=_seed_worker,
                                    generator=torch.Generator().manual_seed(seed * 7919 + epoch),
                                    pin_memory=on_cuda)
                lr = optimizer.param_groups[0]["lr"]
                context.epoch = stage_epoch
                parts, steps, images, seconds = _train_epoch(model, method, loader, optimizer, device, amp,
                                                             channels_last, epoch, total_epochs, writer,
                                                             int(train_cfg["log_every"]), len(sampler), context)
                scheduler.step()
                parts = dist.all_reduce_mean(parts, device)
                epoch += 1
                stage_epoch += 1
                line = {"epoch": epoch, "stage": stage.name, "stage_epoch": stage_epoch, "steps": steps,
                        "images": images * world, "time_s": round(seconds, 3),
                        "images_per_s": round(images * world / max(seconds, 1e-9), 2), "lr": lr,
                        "loss": {k: round(v, 6) for k, v in parts.items()}}
                if main:
                    _check_finite_parameters(method, f"epoch {epoch}")
                    if val_cfg is not None and (epoch % val_cfg["every"] == 0 or epoch == total_epochs):
                        line["validation"] = _validate_epoch(method, data.validation, device, val_cfg, writer, epoch)
                    history.append(line)
                    state = {"model": method.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "rng": rng_state(), "epoch": epoch,
                             "stage": stage_index, "stage_epoch": stage_epoch, "method_state": method.extra_state(),
                             "config": config}
                    save_checkpoint(last, **state)
                    # epoch_NNN.pt: the weights alone (what evaluate --checkpoint epoch_NNN reads), a third of
                    # last.pt's size under AdamW; train.keep_epochs caps how many are kept.
                    save_checkpoint(checkpoint_dir / f"epoch_{epoch:03d}.pt", model=state["model"],
                                    method_state=state["method_state"], epoch=epoch, config=config)
                    _prune_epoch_checkpoints(checkpoint_dir, keep_epochs)
                    if val_cfg is not None and val_cfg["select"] and "validation" in line:
                        best = _keep_best(checkpoint_dir, line, val_cfg, best, state, config)
                    _write_history(metrics_path, history)
                    for key, value in parts.items():
                        writer.add_scalar(f"epoch/{key}", value, epoch)
                    writer.add_scalar("epoch/lr", lr, epoch)
                    writer.add_scalar("epoch/images_per_s", line["images_per_s"], epoch)
                    writer.flush()
                    loss_text = ", ".join(f"{k} {v:.4f}" for k, v in parts.items())
                    log.info("epoch %d/%d: %s; lr %.2g; %.1f images/s", epoch, total_epochs, loss_text, lr,
                             line["images_per_s"])
                dist.barrier()
            stage_index, stage_epoch = stage_index + 1, 0
    finally:
        if writer is not None:
            writer.close()
    if start_epoch >= total_epochs:
        log.info("%s: all %d epochs already done", run_dir, total_epochs)
    return history


def validation_settings(config: dict, data: TrainingData) -> dict | None:
    """The checked ``validation`` section (``every``, ``select``, ``metric``, ``batch_size``), or None when
    there is nothing to validate on (``data.validation`` None or empty: ``validation.fraction`` 0 in
    :func:`open_training_data`)."""
    from gren.train.validation import parse_metric

    section = dict(config.get("validation") or {})
    every = int(section.get("every", 1))
    if every < 1:
        raise GrenError(f"validation.every must be >= 1 (epochs), got {every}")
    metric = str(section.get("metric", "accuracy@0.1"))
    parse_metric(metric)  # a bad name fails before step 1
    if data.validation is None or len(data.validation) == 0:
        if bool(section.get("select", False)):
            log.warning("validation.select is set but there is no validation split (validation.fraction=0); "
                        "no best.pt will be kept")
        return None
    return {"every": every, "select": bool(section.get("select", False)), "metric": metric,
            "batch_size": int(section.get("batch_size", 16))}


def _validate_epoch(method, dataset, device, val_cfg: dict, writer, epoch: int) -> dict:
    """Score the validation split after ``epoch``; log it and write ``validation/*`` TensorBoard scalars."""
    from gren.train.validation import validate

    summary = validate(method, dataset, device, batch_size=val_cfg["batch_size"])
    if writer is not None:
        if summary["auc_mean"] is not None:
            writer.add_scalar("validation/auc_mean", summary["auc_mean"], epoch)
        for kind in ("accuracy_mean", "iobb_mean"):
            for t, value in summary[kind].items():
                if value is not None:
                    writer.add_scalar(f"validation/{kind}@{t}", value, epoch)
    accuracy = ", ".join(f"{t} {'-' if v is None else f'{v:.3f}'}" for t, v in summary["accuracy_mean"].items())
    auc = "-" if summary["auc_mean"] is None else f"{summary['auc_mean']:.3f}"
    log.info("epoch %d validation (%d images, %d boxes): AUC %s; accuracy at IoU %s", epoch, summary["n_images"],
             summary["n_boxes"], auc, accuracy)
    return summary


def _best_so_far(history: list[dict], val_cfg: dict | None) -> float | None:
    """The best ``validation.metric`` value in a (resumed) run's history, None when there is none."""
    if val_cfg is None:
        return None
    from gren.train.validation import metric_value

    values = [metric_value(line["validation"], val_cfg["metric"]) for line in history if "validation" in line]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _keep_best(checkpoint_dir: Path, line: dict, val_cfg: dict, best: float | None, state: dict,
               config: dict) -> float | None:
    """Write ``checkpoints/best.pt`` when the epoch's ``validation.metric`` beats ``best`` (ties keep the earlier
    epoch); returns the new best."""
    from gren.train.validation import metric_value

    value = metric_value(line["validation"], val_cfg["metric"])
    if value is None or (best is not None and value <= best):
        return best
    save_checkpoint(checkpoint_dir / "best.pt", model=state["model"], method_state=state["method_state"],
                    epoch=line["epoch"], config=config,
                    validation={"metric": val_cfg["metric"], "value": value, **line["validation"]})
    log.info("epoch %d: best %s so far (%.4f) -> %s", line["epoch"], val_cfg["metric"], value,
             checkpoint_dir / "best.pt")
    return value


def write_hparams(writer, config: dict, validated: bool) -> None:
    """The run's hyperparameters in TensorBoard's HParams plugin and the resolved config as text, both in the
    writer's own folder (``SummaryWriter.add_hparams`` would make a stray sub-run per call)."""
    import yaml
    from torch.utils.tensorboard.summary import hparams

    def flat(node: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in node.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            elif isinstance(value, (bool, int, float, str)):
                out[f"{prefix}{key}"] = value
            else:
                out[f"{prefix}{key}"] = "null" if value is None else str(value)
        return out

    metrics = {"epoch/total": 0.0}
    if validated:
        metrics.update({"validation/auc_mean": 0.0, "validation/accuracy_mean@0.1": 0.0,
                        "validation/accuracy_mean@0.5": 0.0})
    for summary in hparams(flat(config), metrics):  # experiment, session start, session end
        writer.file_writer.add_summary(summary)
    writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```")


def _prune_epoch_checkpoints(checkpoint_dir: Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` ``epoch_NNN.pt`` files (``None``: keep all)."""
    if keep is None:
        return
    epoch_files = sorted(checkpoint_dir.glob("epoch_*.pt"))
    for path in epoch_files[: max(0, len(epoch_files) - int(keep))]:
        path.unlink(missing_ok=True)


def _train_epoch(model, method, loader, optimizer, device, amp, channels_last, epoch, epochs, writer, log_every,
                 n_steps, context: TrainContext) -> tuple[dict[str, float], int, int, float]:
    """One pass over ``loader``: returns (mean loss parts, steps, images on this rank, seconds)."""
    from gren.data.dataset import check_batch_scale

    model.train()
    sums: dict[str, torch.Tensor] = {}
    steps = images_seen = 0
    start = time.perf_counter()
    # a bar on a terminal, a log line every 30 s in batch logs (gren.core.progress); rank 0 only
    bar = progress(loader, total=n_steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step", logger=log,
                   disable=not dist.is_main_process())
    for batch in bar:
        batch = move_to(batch, device)
        if channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        if steps == 0 and epoch == 0:
            check_batch_scale(batch["image"])  # warns once when the inputs are not on the normalize_uint8 scale
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            parts = model(batch)
        if not isinstance(parts, dict) or "total" not in parts:
            raise GrenError(f"method {method.name!r}: forward(batch) must return a dict with 'total' and its parts")
        total = parts["total"]
        if not torch.isfinite(total):
            values = {k: round(float(v.detach()), 4) for k, v in parts.items()}
            raise GrenError(f"epoch {epoch + 1} step {steps + 1}: the loss is not finite ({values}); "
                            f"lower optim.lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        detached = {key: value.detach().float() for key, value in parts.items()}
        for key, value in detached.items():
            sums[key] = sums.get(key, 0.0) + value
        steps += 1
        images_seen += batch["image"].shape[0]
        context.step, context.global_step, context.losses = steps, epoch * n_steps + steps, detached
        method.on_step_end(context)
        if steps % log_every == 0 or steps == n_steps:
            means = {k: float(v) / steps for k, v in sums.items()}
            bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
            if writer is not None:
                global_step = epoch * n_steps + steps
                for key, value in detached.items():
                    writer.add_scalar(f"step/{key}", float(value), global_step)
    bar.close()
    if on_cuda(device):
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {k: float(v) / max(steps, 1) for k, v in sums.items()}, steps, images_seen, seconds


def on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _config_differences(old: dict, new: dict) -> list[str]:
    def flat(config: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in config.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    a, b = flat(old), flat(new)
    # A key added to the defaults after the run was saved, at its default value, changes nothing; nor does
    # a key the method no longer has (an older run's config held every method's sections).
    defaults = flat(default_config())
    added_at_default = {k for k in b if k not in a and k in defaults and b[k] == defaults[k]}
    removed = {k for k in a if k not in b}
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES and k not in added_at_default
            and k not in removed]


OPTIMIZERS = ("sgd", "adamw", "adam")


def build_optimizer(parameters, optim_cfg: dict) -> torch.optim.Optimizer:
    """``optim.name``: ``sgd`` (the paper's SGD, Nesterov momentum), ``adamw`` or ``adam`` (L2 weight decay,
    as HAM's authors use it); betas default, same lr/wd keys. ``parameters``: tensors or parameter groups
    (dicts, a method's :meth:`~gren.methods.protocol.Method.param_groups`)."""
    name = str(optim_cfg.get("name", "sgd")).lower()
    lr, weight_decay = float(optim_cfg["lr"]), float(optim_cfg["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=float(optim_cfg["momentum"]),
                               nesterov=bool(optim_cfg["nesterov"]), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    raise GrenError(f"optim.name {name!r}: expected one of {', '.join(OPTIMIZERS)}")


def train(data: str | os.PathLike, method: str, out: str | os.PathLike, *, protocol: str | None = None,
          fold: int | None = None, config_file: str | os.PathLike | None = None, overrides: Iterable[str] = (),
          resume: bool = False, foreign: str = "error") -> list[dict]:
    """``gren train``: resolve the config, open the data and fold, train into ``out``. Returns the epoch metrics.

    ``foreign="drop"`` (crossval over several methods): config keys of other methods' sections are left
    out instead of being errors (:func:`gren.train.config.resolve_config`).

    The run folder (docs/training.md, "The run folder"; :mod:`gren.core.outputs`): every value of the
    config is checked first (nothing is read or written before); ``out`` must be absent, empty or a gren
    run (``.gren-run`` marker, written first into a new run; a run made before markers is adopted); the
    process holds ``out/.lock`` (``flock``) for the whole training, so a second ``gren train`` into the
    same folder stops at once naming the first one's PID (under DDP rank 0 holds it). After the data is
    opened the marker records where it came from (``data``: the path given, the cache, its source folder
    and the fingerprint of its contents), which ``gren evaluate`` uses to tell the run's own data from
    other data.

    Raises:
        GrenError: bad config, ``out`` not a run folder, a run folder in use, an existing run without
            ``resume``, a resumed run with a different config (other than ``train.epochs``,
            ``train.log_every``, ``train.keep_epochs``, ``data.workers``, ``device.device``).
    """
    method_class(method)  # an unknown name lists the registered ones
    config = resolve_config(config_file, overrides, method=method, foreign=foreign)
    config["data"]["path"] = str(Path(data).expanduser().resolve())
    if protocol is not None:
        config["data"]["protocol"] = check_value("data.protocol", str(protocol), f"--protocol {protocol}",
                                                 method=method, config=config)
    if fold is not None:
        config["data"]["fold"] = check_value("data.fold", fold, f"--fold {fold}", method=method, config=config)
    validate_config(config, "--fold")
    select_device(config["device"]["device"])  # cuda asked for where there is none: said before any work
    run_dir = Path(out).expanduser()
    dist.init_distributed()
    main = dist.is_main_process()
    if main:  # (other ranks would race rank 0's first writes)
        check_run_folder(run_dir)  # a non-empty folder that is not a run: refused before anything is written
    _check_resume(run_dir, config, resume)
    lock = None
    try:
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir).acquire()
            kind = check_run_folder(run_dir)  # again, now that no other gren train can change it
            _check_resume(run_dir, config, resume)
            if kind == "legacy":
                log.info("%s: a run made before run markers; adding %s", run_dir, RUN_MARKER)
            write_run_marker(run_dir, method)
            save_config(config, run_dir / "config.yaml")
        dist.barrier()
        training_data = open_training_data(data, config, run_dir, resume=resume)
        if main:
            write_run_marker(run_dir, method, data=_data_record(config, training_data))
        history = fit(config, run_dir, training_data, resume=resume)
    finally:
        if lock is not None:
            lock.release()
    if history:
        final = history[-1]
        log.info("done: %s after %d epochs (loss %.4f)", run_dir, final["epoch"], final["loss"].get("total", math.nan))
    return history


def _check_resume(run_dir: Path, config: dict, resume: bool) -> None:
    """``--resume`` with the run's config (bar :data:`RESUMABLE_CHANGES`), or no ``--resume`` and no trained run."""
    saved_config_path = run_dir / "config.yaml"
    if resume and saved_config_path.is_file():
        differences = _config_differences(load_yaml(saved_config_path), config)
        if differences:
            raise GrenError(f"{run_dir}: --resume with a different config than the run's ({'; '.join(differences)}); "
                            f"use the run's settings or a new --out")
    elif not resume and (run_dir / "checkpoints" / "last.pt").is_file():
        raise GrenError(f"{run_dir} already holds a trained run; pass --resume to continue it or choose a new --out")


def _data_record(config: dict, training_data: TrainingData) -> dict:
    """Where a run's training data came from (for the run marker): the path given, the cache, the cache's
    source folder and the fingerprint of that folder's contents when the cache records them."""
    from gren.data import cache_format

    record = {"path": config["data"]["path"], "cache": None, "source_dir": None, "source_sha256": None}
    cache_path = Path(training_data.source)
    if cache_path.is_dir():
        meta = cache_format.read_meta(cache_path) or {}
        record["cache"] = str(cache_path.resolve())
        record["source_dir"] = str(Path(meta["data_dir"]).resolve()) if meta.get("data_dir") else None
        record["source_sha256"] = (meta.get("params") or {}).get("source_sha256")
    return record
