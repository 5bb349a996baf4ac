"""Config resolution, the mixed sampler, the training loop: exact resume, a falling box loss, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from _train_fakes import FakeLesionDataset, small_config
from gren.core.checkpoint import load_checkpoint
from gren.core.errors import GrenError
from gren.train.config import bundled_configs, resolve_config
from gren.train.engine import TrainingData, fit
from gren.train.sampler import MixedBatchSampler

# ---------------------------------------------------------------- config


def test_defaults_are_the_papers_schedule():
    config = resolve_config()
    assert config["optim"] == {"name": "sgd", "lr": 0.001, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0001,
                               "step_epochs": 4, "gamma": 0.1}
    assert config["train"]["epochs"] == 9 and config["train"]["batch_size"] == 4
    assert config["model"]["backbone"] == "resnet50" and config["model"]["output_stride"] == 32
    assert config["graph"]["lambda_intra"] == 0.11 and config["graph"]["lambda_inter"] == 0.15
    assert config["loss"]["beta"] == 4.0 and config["graph"]["form"] == "pull"
    assert {"default", "cpu-small"} <= set(bundled_configs())


def test_optimizer_choice():
    import torch

    from gren.core.errors import GrenError
    from gren.train.engine import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer(params, resolve_config()["optim"])
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    adamw = build_optimizer(params, resolve_config(None, ["optim.name=adamw", "optim.lr=0.002"])["optim"])
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["lr"] == 0.002
    adam = build_optimizer(params, resolve_config(None, ["optim.name=adam"])["optim"])
    assert type(adam) is torch.optim.Adam
    with pytest.raises(GrenError, match="sgd, adamw, adam"):
        build_optimizer(params, {**resolve_config()["optim"], "name": "lbfgs"})


def test_overrides_and_files(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("optim:\n  lr: 0.05\nmodel:\n  backbone: resnet34\n")
    config = resolve_config(user, ["optim.lr=1e-2", "data.annotated_fraction=null", "data.protocol=1.0_0.4",
                                   "train.epochs=3", "device.compile=true"])
    assert config["optim"]["lr"] == 0.01 and config["model"]["backbone"] == "resnet34"
    assert config["data"]["annotated_fraction"] is None and config["data"]["protocol"] == "1.0_0.4"
    assert config["train"]["epochs"] == 3 and config["device"]["compile"] is True
    small = resolve_config("cpu-small")
    assert small["model"]["backbone"] == "resnet18" and small["model"]["output_stride"] == 16


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(GrenError, match="unknown key 'optim.learning_rate'.*optim.lr"):
        resolve_config(None, ["optim.learning_rate=0.1"])
    with pytest.raises(GrenError, match="KEY=VALUE"):
        resolve_config(None, ["optim.lr"])
    with pytest.raises(GrenError, match="train.epochs cannot be null"):
        resolve_config(None, ["train.epochs=null"])
    assert resolve_config(None, ["train.max_steps_per_epoch=None"])["train"]["max_steps_per_epoch"] is None
    with pytest.raises(GrenError, match="must be a number"):
        resolve_config(None, ["optim.lr=fast"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(GrenError, match="bad.yaml: unknown config key 'optim.lrr'"):
        resolve_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [1,\n")
    with pytest.raises(GrenError, match="broken.yaml:"):
        resolve_config(broken)
    with pytest.raises(GrenError, match="not found"):
        resolve_config("no-such-config")


# ---------------------------------------------------------------- sampler


def test_sampler_mixes_pools_deterministically():
    annotated, unannotated = list(range(5)), list(range(5, 25))
    sampler = MixedBatchSampler(annotated, unannotated, batch_size=4, annotated_fraction=0.25, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7  # ceil(20 label-only / 3 per batch)
    assert all(len(b) == 4 and sum(i < 5 for i in b) == 1 for b in batches)
    assert set(unannotated) <= {i for b in batches for i in b}
    assert batches == list(sampler)  # same epoch, same batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    again = MixedBatchSampler(annotated, unannotated, batch_size=4, annotated_fraction=0.25, seed=3)
    again.set_epoch(1)
    assert list(again) == list(sampler)


def test_sampler_shards_by_rank_and_handles_single_pools():
    annotated, unannotated = list(range(4)), list(range(4, 30))
    single = MixedBatchSampler(annotated, unannotated, 4, 0.5, seed=0).global_batches(0)
    full = MixedBatchSampler(annotated, unannotated, 4, 0.5, seed=0, world_size=2).global_batches(0)
    assert len(single) == 13 and len(full) == 14 and full[:13] == single  # padded to a multiple of the world size
    shards = [list(MixedBatchSampler(annotated, unannotated, 4, 0.5, seed=0, rank=r, world_size=2)) for r in (0, 1)]
    assert shards[0] == full[0::2] and shards[1] == full[1::2] and len(shards[0]) == 7
    only_labels = list(MixedBatchSampler([], list(range(10)), 4, 0.25))
    assert len(only_labels) == 3 and all(len(b) == 4 for b in only_labels)
    natural = MixedBatchSampler(annotated, unannotated, 4, None, max_batches=2)
    assert len(list(natural)) == 2


# ---------------------------------------------------------------- training loop


def _data(n=12, n_annotated=4):
    dataset = FakeLesionDataset(n=n, size=64, n_annotated=n_annotated)
    return TrainingData(dataset, dataset.annotated, dataset.unannotated)


class AugmentedFakes(FakeLesionDataset):
    """The fake lesions through the lung-safe augmentation, which draws from torch's global RNG (workers=0)."""

    def __getitem__(self, index: int) -> dict:
        from gren.data.cache import LungSafeAugment

        item = dict(super().__getitem__(index))
        item["image"], item["lung_masks"], item["boxes"], item["box_labels"] = LungSafeAugment(min_scale=0.7)(
            item["image"], item["lung_masks"], item["boxes"], item["box_labels"])
        return item


def test_resume_is_bit_exact(tmp_path):
    """Killed after epoch 1 and resumed: the same weights and losses, with a learning-rate schedule that steps
    between the two halves and an augmentation that draws from the RNG (both must be restored)."""
    def config(epochs):
        cfg = small_config(train={"epochs": epochs, "batch_size": 4, "max_steps_per_epoch": 2},
                           optim={"lr": 0.01, "step_epochs": 1}, data={"annotated_fraction": 0.25})
        cfg["method"] = "gren"
        return cfg

    dataset = AugmentedFakes(n=12, size=64, n_annotated=4)
    data = TrainingData(dataset, dataset.annotated, dataset.unannotated)
    straight = fit(config(2), tmp_path / "straight", data)
    fit(config(1), tmp_path / "resumed", data)  # "killed" after epoch 1
    torch.manual_seed(12345)  # whatever the RNG holds now, resume restores the saved state
    resumed = fit(config(2), tmp_path / "resumed", data, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [line["loss"] for line in straight] == [line["loss"] for line in resumed]
    lines = [json.loads(s) for s in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert {"total", "box", "mil", "intra", "inter"} == set(lines[1]["loss"])
    assert lines[0]["lr"] == pytest.approx(0.01) and lines[1]["lr"] == pytest.approx(0.001)  # the schedule stepped
    assert lines[1]["images_per_s"] > 0
    assert (tmp_path / "resumed" / "checkpoints" / "epoch_001.pt").is_file()
    assert any((tmp_path / "resumed" / "tb").iterdir())
    # the augmentation really draws from the RNG: another seed gives other weights
    other = small_config(train={"epochs": 2, "batch_size": 4, "max_steps_per_epoch": 2},
                         optim={"lr": 0.01, "step_epochs": 1}, data={"annotated_fraction": 0.25})
    other["method"], other["seed"] = "gren", 1
    fit(other, tmp_path / "other", data)
    c = load_checkpoint(tmp_path / "other" / "checkpoints" / "last.pt")
    assert any(not torch.equal(v, c["model"][k]) for k, v in a["model"].items())


class _TwoStage:
    """A registered test method: a warm-up stage of min(2, E) epochs at lr 0.02, then E - 2 epochs at the
    config's lr; counts its steps in its extra state; its per-item transform draws from the RNG."""

    name = "test-two-stage"

    @staticmethod
    def build():
        from gren.methods import Stage
        from gren.methods.grid_mil import GridMILMethod

        class TwoStage(GridMILMethod):
            def __init__(self, config):
                super().__init__(config)
                self.steps_seen = 0
                self.stages_started = []

            def stages(self, config):
                epochs = int(config["train"]["epochs"])
                return [Stage("warmup", min(2, epochs), {"lr": 0.02}), Stage("main", max(0, epochs - 2))]

            def item_transform(self, config):
                def jitter(item):
                    item = dict(item)
                    item["image"] = item["image"] + 0.05 * torch.randn_like(item["image"])
                    return item
                return jitter

            def on_stage_start(self, stage, context):
                self.stages_started.append((stage.name, context.epoch))

            def on_step_end(self, context):
                self.steps_seen += 1

            def extra_state(self):
                return {"steps_seen": self.steps_seen}

            def load_extra_state(self, state):
                self.steps_seen = int(state.get("steps_seen", 0))

        return TwoStage


def test_resume_continues_at_the_right_stage_and_epoch(tmp_path):
    from gren.methods import register_method, unregister_method
    from gren.train import engine

    register_method(_TwoStage.name)(_TwoStage.build())
    built = []
    original_build = engine.build_method

    def keep(*args, **kwargs):
        built.append(original_build(*args, **kwargs))
        return built[-1]

    engine.build_method = keep
    try:
        def config(epochs):
            cfg = small_config(train={"epochs": epochs, "batch_size": 4, "max_steps_per_epoch": 2},
                               optim={"lr": 0.005, "step_epochs": 10})
            cfg["method"] = _TwoStage.name
            return cfg

        data = _data()
        straight = fit(config(4), tmp_path / "straight", data)
        assert [(line["stage"], line["stage_epoch"], line["lr"]) for line in straight] == [
            ("warmup", 1, 0.02), ("warmup", 2, 0.02), ("main", 1, 0.005), ("main", 2, 0.005)]
        assert built[-1].stages_started == [("warmup", 0), ("main", 0)] and built[-1].steps_seen == 8
        fit(config(1), tmp_path / "resumed", data)  # killed inside the warm-up
        fit(config(3), tmp_path / "resumed", data, resume=True)  # resumes in the warm-up, killed inside main
        assert built[-1].stages_started == [("warmup", 1), ("main", 0)]
        resumed = fit(config(4), tmp_path / "resumed", data, resume=True)
        assert built[-1].stages_started == [("main", 1)] and built[-1].steps_seen == 8
        a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
        b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
        assert (b["stage"], b["stage_epoch"], b["method_state"]) == (1, 2, {"steps_seen": 8})
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), key
        assert [line["loss"] for line in straight] == [line["loss"] for line in resumed]
    finally:
        engine.build_method = original_build
        unregister_method(_TwoStage.name)


def test_epoch_checkpoints_hold_weights_only_and_are_pruned(tmp_path):
    cfg = small_config(train={"epochs": 3, "batch_size": 4, "max_steps_per_epoch": 1, "keep_epochs": 2})
    cfg["method"] = "baseline"
    fit(cfg, tmp_path / "run", _data())
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.pt")) == ["epoch_002.pt", "epoch_003.pt", "last.pt"]
    epoch = load_checkpoint(checkpoints / "epoch_003.pt")
    last = load_checkpoint(checkpoints / "last.pt")
    assert set(epoch) == {"format", "model", "method_state", "epoch", "config"} and epoch["epoch"] == 3
    assert {"optimizer", "scheduler", "rng"} <= set(last)
    for key, value in last["model"].items():
        assert torch.equal(value, epoch["model"][key]), key
    cfg["train"]["keep_epochs"] = None
    fit(cfg, tmp_path / "all", _data())
    assert len(list((tmp_path / "all" / "checkpoints").glob("epoch_*.pt"))) == 3


def test_box_loss_falls_on_a_synthetic_lesion_task(tmp_path):
    dataset = FakeLesionDataset(n=32, size=48, n_annotated=32)  # 3 x 3 cells of 16 px, 12 px lesions
    config = small_config(train={"epochs": 3, "batch_size": 4}, optim={"lr": 0.01, "step_epochs": 10},
                          data={"annotated_fraction": None, "size": 48})
    config["method"] = "baseline"
    data = TrainingData(dataset, dataset.annotated, dataset.unannotated)
    losses = []

    from gren.methods.grid_mil import GridMILMethod

    original = GridMILMethod.forward

    def recording(self, batch):
        parts = original(self, batch)
        losses.append(parts["box"].item())
        return parts

    GridMILMethod.forward = recording
    try:
        fit(config, tmp_path / "run", data)
    finally:
        GridMILMethod.forward = original
    assert len(losses) == 24
    start, end = sum(losses[:3]) / 3, sum(losses[-4:]) / 4
    assert end < 0.2 * start, (start, end)


def test_non_finite_loss_is_a_clear_error(tmp_path):
    config = small_config(train={"epochs": 1, "max_steps_per_epoch": 3}, optim={"lr": 1e12})
    config["method"] = "baseline"
    with pytest.raises(GrenError, match="not finite"):
        fit(config, tmp_path / "run", _data())


def test_saved_config_is_the_resolved_one(tmp_path, monkeypatch):
    from gren.train import engine

    def fake_open(data_path, config, run_dir, resume=False):
        return _data(8, 4)

    monkeypatch.setattr(engine, "open_training_data", fake_open)
    overrides = ["model.backbone=resnet18", "model.output_stride=16", "model.head_hidden=16", "data.size=64",
                 "data.workers=0", "device.device=cpu", "train.epochs=1", "train.max_steps_per_epoch=1"]
    engine.train("unused", "gren-intra", tmp_path / "run", protocol="1.0_0.4", fold=2, overrides=overrides)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["method"] == "gren-intra" and saved["data"]["protocol"] == "1.0_0.4" and saved["data"]["fold"] == 2
    assert saved["data"]["path"] == str(Path("unused").resolve())  # evaluate finds the data from the run
    with pytest.raises(GrenError, match="already holds a trained run"):
        engine.train("unused", "gren-intra", tmp_path / "run", protocol="1.0_0.4", fold=2, overrides=overrides)
    with pytest.raises(GrenError, match="different config.*optim.lr"):
        engine.train("unused", "gren-intra", tmp_path / "run", protocol="1.0_0.4", fold=2,
                     overrides=overrides + ["optim.lr=0.5"], resume=True)
    history = engine.train("unused", "gren-intra", tmp_path / "run", protocol="1.0_0.4", fold=2,
                           overrides=overrides + ["train.epochs=2"], resume=True)  # extend the run by one epoch
    assert [line["epoch"] for line in history] == [1, 2]


def test_a_config_key_added_later_at_its_default_does_not_block_resume():
    from gren.train import engine
    from gren.train.config import resolve_config

    new = resolve_config(None, [])
    old = resolve_config(None, [])
    del old["graph"]["edge_scale"]  # a run saved before the key existed
    assert engine._config_differences(old, new) == []
    changed = resolve_config(None, ["graph.edge_scale=rank"])
    assert engine._config_differences(old, changed) == ["graph.edge_scale: None -> 'rank'"]


def test_cli_overrides_may_follow_options(monkeypatch):
    from gren import cli
    from gren.train import engine

    seen = {}
    monkeypatch.setattr(engine, "train", lambda *args, **kwargs: seen.update(kwargs))
    assert cli.main(["train", "--data", "D", "--method", "baseline", "data.size=64", "--out", "R",
                     "train.epochs=2"]) == 0
    assert seen["overrides"] == ["data.size=64", "train.epochs=2"]
    with pytest.raises(SystemExit):
        cli.main(["train", "--data", "D", "--method", "baseline", "--out", "R", "--no-such-option"])


def test_a_methods_batch_sampler_and_gradients_at_test_time(tmp_path):
    """The engine samples with the method's own batch sampler when it has one, and predict() runs
    localize under gradients for a method that declares localize_needs_grad (Grad-CAM-like methods)."""
    from gren.methods import Localization, register_method, unregister_method
    from gren.methods.grid_mil import GridMILMethod

    class Pairs:
        """Fixed pairs of consecutive images, three per epoch (a CIA/CCG-style pairing sampler)."""

        def __init__(self):
            self.epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __iter__(self):
            return iter([[0, 1], [2, 3], [4, 5]])

        def __len__(self):
            return 3

    sampler = Pairs()

    class Paired(GridMILMethod):
        localize_needs_grad = True

        def batch_sampler(self, data, config, *, seed, rank, world_size):
            return sampler

        def localize(self, images):
            assert torch.is_grad_enabled()
            images = images.detach().requires_grad_(True)
            loc = super().localize(images)
            (grad,) = torch.autograd.grad(loc.maps.sum(), images)
            return Localization(loc.maps.detach(), loc.scores.detach(), 0.5, evidence=grad.abs().flatten(1)[:, :14])

    register_method("test-paired")(Paired)
    try:
        cfg = small_config(train={"epochs": 2, "batch_size": 4})
        cfg["method"] = "test-paired"
        history = fit(cfg, tmp_path / "run", _data())
        assert [line["steps"] for line in history] == [3, 3] and [line["images"] for line in history] == [6, 6]
        assert sampler.epochs == [0, 1]
        from gren.methods import load_run

        method, _ = load_run(tmp_path / "run")
        loc = method.predict(torch.zeros(2, 1, 64, 64))
        assert loc.evidence is not None and loc.evidence.shape == (2, 14)  # localize ran with gradients
    finally:
        unregister_method("test-paired")
