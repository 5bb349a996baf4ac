"""Iterative attention mining: its stages, the erasure (training images of later rounds only, growing over
rounds), the knowledge-preservation term, the fused test maps, and a resume inside a mining round."""

from __future__ import annotations

import pytest
import torch

from _train_fakes import FakeLesionDataset
from gren.core.checkpoint import load_checkpoint
from gren.methods import Stage, TrainContext
from test_methods import build, fake_batch, method_config


def _enter_round(method, index: int, epoch: int = 0) -> None:
    stage = method.stages(method.config)[index]
    method.on_stage_start(stage, TrainContext(config=method.config, device=torch.device("cpu"), stage=stage,
                                              stage_index=index, epoch=epoch))


def _perturb(net, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_one_stage_per_round_with_the_round_settings():
    method = build("iam", ["train.epochs=9", "optim.lr=0.01"])
    assert method.stages(method.config) == [Stage("round0", 9), Stage("round1", 3, {"lr": pytest.approx(0.001)}),
                                            Stage("round2", 3, {"lr": pytest.approx(0.001)})]
    other = build("iam", ["train.epochs=2", "iam.rounds=3", "iam.round_epochs=4", "iam.round_lr_factor=1"])
    stages = other.stages(other.config)
    assert [s.name for s in stages] == ["round0", "round1", "round2", "round3"]
    assert [s.epochs for s in stages] == [2, 4, 4, 4] and len(other.snapshots) == 3
    assert build("iam", ["iam.rounds=0"]).stages(method_config("iam")) == [Stage("round0", 9)]


def test_erasure_touches_only_the_training_images_of_later_rounds():
    method = build("iam", ["iam.erase_threshold=0.5"])
    batch = fake_batch()
    batch["labels"][1] = 0  # image 1: no positive label, nothing to mine
    seen = []
    hooks = [net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
             for net in (method.net, *method.snapshots)]
    method(batch)  # round 0: the original films
    assert len(seen) == 1 and torch.equal(seen[0], batch["image"])
    _enter_round(method, 1)
    assert method.rounds_done == 1
    seen.clear()
    method(batch)
    assert torch.equal(seen[0], batch["image"])  # snapshot 0 mines on the original films
    student = seen[1]
    erased, original = student[:4], student[4:]
    assert torch.equal(original, batch["image"])  # KP's inputs: the original films
    _, mined, _ = method.erase(batch["image"], batch["labels"])
    changed = erased != batch["image"]
    assert bool(mined.any()) and bool((changed <= mined).all())  # only mined pixels change...
    fill = batch["image"].mean(dim=(1, 2, 3), keepdim=True).expand_as(erased)
    assert torch.equal(erased[mined], fill[mined])  # ... to the film's mean
    assert not bool(mined[1].any()) and torch.equal(erased[1], batch["image"][1])
    seen.clear()
    method.predict(batch["image"])  # test time: every round's network on the original films
    assert len(seen) == 2 and all(torch.equal(x, batch["image"]) for x in seen)
    for hook in hooks:
        hook.remove()


def test_the_erased_region_grows_over_the_rounds():
    method = build("iam", ["iam.erase_threshold=0.5"])
    batch = fake_batch()
    _enter_round(method, 1)
    _perturb(method.net)
    _enter_round(method, 2)
    assert method.rounds_done == 2
    _, first, _ = method.erase(batch["image"], batch["labels"], rounds=1)
    erased, both, teacher = method.erase(batch["image"], batch["labels"], rounds=2)
    assert bool((first <= both).all()) and int(both.sum()) > int(first.sum())
    with torch.no_grad():
        round0_logits, _ = method.snapshots[0](batch["image"])
    torch.testing.assert_close(teacher, round0_logits.float())  # KP's reference: round 0 on the originals


def test_knowledge_preservation_is_zero_for_an_unchanged_network():
    method = build("iam")
    batch = fake_batch()
    _enter_round(method, 1)
    method.eval()
    with torch.no_grad():
        unchanged = method(batch)
    assert float(unchanged["kp"]) == 0.0 and float(unchanged["bce"]) > 0
    _perturb(method.net)
    with torch.no_grad():
        assert float(method(batch)["kp"]) > 1e-6


def test_a_resume_inside_a_round_keeps_its_snapshots():
    method = build("iam")
    _enter_round(method, 1)
    frozen = {k: v.clone() for k, v in method.snapshots[0].state_dict().items()}
    _perturb(method.net)
    _enter_round(method, 1, epoch=1)  # resumed inside round 1: no new snapshot
    assert all(torch.equal(v, method.snapshots[0].state_dict()[k]) for k, v in frozen.items())
    assert method.rounds_done == 1 and method.extra_state() == {"rounds_done": 1}


def test_test_maps_are_the_pixelwise_max_of_the_rounds():
    method = build("iam")
    images = fake_batch(2)["image"]
    _enter_round(method, 1)
    _perturb(method.net, 0.2)
    method.eval()
    with torch.no_grad():
        loc = method.localize(images)
        parts = []
        for net in (method.snapshots[0], method.net):
            logits, activations = net(images)
            parts.append((net.normalized_cams(activations), torch.sigmoid(logits)))
    torch.testing.assert_close(loc.maps, torch.maximum(parts[0][0], parts[1][0]))
    torch.testing.assert_close(loc.scores, (parts[0][1] + parts[1][1]) / 2)
    assert not torch.equal(parts[0][0], parts[1][0])
    assert loc.maps.shape[-2:] == (8, 8)  # the C3 grid: 64 px / 8


def test_resume_mid_round_gives_the_uninterrupted_weights(tmp_path):
    from gren.train.engine import TrainingData, fit

    def config(round_epochs):
        return method_config("iam", ["train.epochs=1", "iam.rounds=1", f"iam.round_epochs={round_epochs}",
                                     "train.batch_size=4", "train.max_steps_per_epoch=2", "optim.lr=0.01",
                                     "optim.step_epochs=1", "iam.erase_threshold=0.5", "train.keep_epochs=null"])

    dataset = FakeLesionDataset(n=12, size=64, n_annotated=4)

    def data():
        return TrainingData(dataset, dataset.annotated, dataset.unannotated)

    straight = fit(config(2), tmp_path / "straight", data())
    assert [(line["stage"], line["stage_epoch"]) for line in straight] == [("round0", 1), ("round1", 1), ("round1", 2)]
    fit(config(1), tmp_path / "resumed", data())  # killed after the first epoch of round 1
    resumed = fit(config(2), tmp_path / "resumed", data(), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert (b["stage"], b["stage_epoch"], b["method_state"]) == (1, 2, {"rounds_done": 1})
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [line["loss"] for line in straight] == [line["loss"] for line in resumed]
    assert straight[-1]["loss"]["kp"] > 0 and straight[0]["loss"]["kp"] == 0
    # the snapshot is round 0's final weights, not the live network's
    round0 = {k[len("snapshots.0."):]: v for k, v in a["model"].items() if k.startswith("snapshots.0.")}
    live = {k[len("net."):]: v for k, v in a["model"].items() if k.startswith("net.")}
    assert round0.keys() == live.keys() and any(not torch.equal(round0[k], live[k]) for k in live)
    end_of_round0 = load_checkpoint(tmp_path / "straight" / "checkpoints" / "epoch_001.pt")["model"]
    assert all(torch.equal(round0[k], end_of_round0[f"net.{k}"]) for k in round0)
