"""Outputs (GREN issue 15 items 1, 3, 5): a model evaluated on data it never saw, run folders and output
folders that never lose data, numbers that stay finite. Every case checks the exit status, the message and
that no file outside the command's own outputs changed (file lists with sizes and mtimes before and after)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from eval_helpers import TINY_OVERRIDES, make_tiny_dataset
from gren.cli import main
from gren.core.errors import GrenError
from gren.core.outputs import OUTPUTS_MANIFEST, RUN_MARKER, RunLock, read_run_marker
from gren.eval.evaluate import evaluate_run
from robustness_helpers import make_dataset, snapshot

TRAIN = ["--method", "baseline", "--protocol", "0.5_0.8", "--fold", "0"]


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _changed(before: dict, after: dict) -> set:
    """Relative paths (as str) added, removed or modified between two snapshots."""
    keys = set(before) | set(after)
    return {os.fsdecode(k) for k in keys if before.get(k) != after.get(k)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained tiny run, its raw data folder, and an OTHER folder (another seed, other films)."""
    from gren.train.engine import train

    root = tmp_path_factory.mktemp("outputs")
    data = make_tiny_dataset(root / "data", n=32, size=96, seed=0)
    other = make_tiny_dataset(root / "other", n=24, size=96, seed=5)
    run = root / "run"
    train(data, "baseline", run, protocol="0.5_0.8", fold=0, overrides=TINY_OVERRIDES)
    return {"root": root, "data": data, "other": other, "run": run}


@pytest.fixture
def run_copy(world, tmp_path):
    """A copy of the trained run (tests change it), marker included."""
    copy = tmp_path / "run"
    shutil.copytree(world["run"], copy)
    return copy


# -- item 1: evaluate a model on data it never saw ---------------------------------------------------------------


def test_evaluate_on_other_data_scores_all_its_annotated_images(world, run_copy, tmp_path, caplog):
    other = world["other"]
    assert main(["evaluate", "--run", str(run_copy)]) == 0  # the test split first: RUN/eval.json
    own = json.loads((run_copy / "eval.json").read_text())
    assert own["images"] == "test split"
    before, other_before = snapshot(run_copy), snapshot(other)
    assert main(["evaluate", "--run", str(run_copy), "--data", str(other)]) == 0
    result = json.loads((run_copy / "eval-other.json").read_text())
    n_annotated = 12  # make_tiny_dataset: i % 4 in (0, 1) has a box
    assert result["images"] == "all annotated" and result["n_images"] == n_annotated
    assert sum(result["n_boxes"].values()) == n_annotated and result["n_images_auc"] == 24
    assert result["auc_images"] == "all" and result["output"] == str(run_copy / "eval-other.json")
    assert (run_copy / "eval-other.md").read_text().startswith("# Evaluation: baseline")
    assert _changed(before, snapshot(run_copy)) == {"eval-other.json", "eval-other.md"}  # eval.json untouched
    assert all(path.startswith(".gren_cache") for path in _changed(other_before, snapshot(other)))  # its cache only

    out = tmp_path / "elsewhere" / "scores.json"
    assert main(["evaluate", "--run", str(run_copy), "--data", str(other), "--out", str(out), "--json"]) == 0
    assert json.loads(out.read_text())["n_images"] == n_annotated and out.with_suffix(".md").is_file()

    namesake = make_tiny_dataset(tmp_path / "b" / "other", n=16, size=96, seed=9)  # another folder named other
    caplog.set_level(logging.WARNING)
    assert main(["evaluate", "--run", str(run_copy), "--data", str(namesake)]) == 0
    assert "eval-other.json: replacing an evaluation of" in caplog.text  # said, not silent
    assert json.loads((run_copy / "eval-other.json").read_text())["n_images"] == 8


def test_the_runs_own_data_by_path_cache_or_moved_copy_gives_the_test_split(world, run_copy, tmp_path):
    data = world["data"]
    cache = next((data / ".gren_cache").iterdir())
    moved = tmp_path / "moved"
    shutil.copytree(data, moved, ignore=shutil.ignore_patterns(".gren_cache"))  # copy2 keeps the times
    for given in (data, cache, moved):
        result = evaluate_run(run_copy, data=given, progress=False, write=False)
        assert result["images"] == "test split", given
    assert not (run_copy / "eval.json").exists()
    with pytest.raises(GrenError, match="would include the .* training images"):
        evaluate_run(run_copy, data=data, subset="all", progress=False)


def test_zero_images_is_an_error_not_an_empty_eval_json(world, run_copy, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    unboxed = make_dataset(tmp_path / "unboxed", n=8, size=48, boxed=0)
    strangers = make_dataset(tmp_path / "strangers", n=8, size=48)  # other image names than the run's
    before = snapshot(run_copy)
    assert main(["evaluate", "--run", str(run_copy), "--data", str(unboxed)]) == 2
    assert "nothing to evaluate" in _errors(caplog)[-1] and "annotated images" in _errors(caplog)[-1]
    assert main(["evaluate", "--run", str(run_copy), "--data", str(strangers), "--subset", "test"]) == 2
    assert "holds none of the run's test images" in _errors(caplog)[-1]
    assert snapshot(run_copy) == before  # no eval file of any name


def test_a_final_model_trained_on_every_annotated_image(world, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    run = tmp_path / "final"
    argv = ["train", "--data", str(world["data"]), "--method", "baseline", "--protocol", "all", "--out", str(run),
            *TINY_OVERRIDES]
    assert main(argv) == 0
    split = (run / "split.csv").read_text().splitlines()
    rows = [line.split(",") for line in split[1:]]
    assert rows and not any(r[2] == "test" for r in rows)
    assert sum(r[2] == "train" and r[3] == "yes" for r in rows) == 16  # every annotated image trains
    assert main(["evaluate", "--run", str(run)]) == 2
    message = _errors(caplog)[-1]
    assert "has no test images" in message and "trained on every annotated image" in message
    assert "--data OTHER" in message
    assert main(["evaluate", "--run", str(run), "--data", str(world["data"])]) == 2  # its own data: no test split
    assert not (run / "eval.json").exists()
    assert main(["evaluate", "--run", str(run), "--data", str(world["other"])]) == 0
    assert json.loads((run / "eval-other.json").read_text())["n_images"] == 12
    # data.protocol=1.0_1.0 means the same
    from gren.data.splits import parse_protocol

    assert parse_protocol("1.0_1.0") == parse_protocol("all")


def test_evaluate_out_never_replaces_a_file_it_did_not_write(world, run_copy, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    before = snapshot(tmp_path)
    assert main(["evaluate", "--run", str(run_copy), "--data", str(world["other"]), "--out", str(mine)]) == 2
    assert "not an evaluation written by gren" in _errors(caplog)[-1]
    victim = tmp_path / "victim.md"
    victim.write_text("precious")
    os.symlink(victim, run_copy / "eval-other.md")
    before = snapshot(tmp_path)
    assert main(["evaluate", "--run", str(run_copy), "--data", str(world["other"])]) == 2
    assert "symbolic link" in _errors(caplog)[-1]
    assert snapshot(tmp_path) == before and victim.read_text() == "precious" and mine.read_text() == '{"my": "notes"}'


# -- item 3: gren train never clobbers, never shares a run folder --------------------------------------------


def test_train_refuses_a_non_empty_folder_that_is_not_a_run(world, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("my: own\n")  # a config alone does not make a run
    (folder / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    assert main(["train", "--data", str(world["data"]), *TRAIN, "--out", str(folder), *TINY_OVERRIDES]) == 2
    message = _errors(caplog)[-1]
    assert "not empty (config.yaml, notes.txt)" in message and "not a gren run" in message
    assert snapshot(tmp_path) == before


def test_a_run_folder_gets_a_marker_first_and_records_its_data(world):
    marker = read_run_marker(world["run"])
    assert marker["gren_run"] == 1 and marker["method"] == "baseline" and marker["created"].endswith("Z")
    record = marker["data"]
    assert record["path"] == str(world["data"].resolve()) and record["source_dir"] == str(world["data"].resolve())
    assert len(record["source_sha256"]) == 64 and Path(record["cache"]).parent.name == ".gren_cache"


def test_a_run_made_before_markers_is_adopted_on_resume(world, run_copy):
    (run_copy / RUN_MARKER).unlink()
    argv = ["train", "--data", str(world["data"]), *TRAIN, "--out", str(run_copy), "--resume", *TINY_OVERRIDES]
    assert main(argv) == 0  # all epochs done: nothing trained, the marker added
    assert read_run_marker(run_copy)["method"] == "baseline"


_HOLDER = textwrap.dedent("""
    import sys, time
    from gren.core.outputs import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_second_train_into_a_locked_run_names_the_holder(world, run_copy, caplog):
    caplog.set_level(logging.ERROR)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_copy)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run_copy)
        argv = ["train", "--data", str(world["data"]), *TRAIN, "--out", str(run_copy), "--resume", *TINY_OVERRIDES]
        assert main(argv) == 2
        message = _errors(caplog)[-1]
        assert f"another process (PID {holder.pid})" in message and "holds its lock" in message
        assert _changed(before, snapshot(run_copy)) == set()
        assert RunLock(run_copy).is_held_elsewhere()
    finally:
        holder.kill()
        holder.wait()
    assert not RunLock(run_copy).is_held_elsewhere()  # the kernel drops a dead holder's lock
    assert main(["train", "--data", str(world["data"]), *TRAIN, "--out", str(run_copy), "--resume",
                 *TINY_OVERRIDES]) == 0


def test_the_lock_is_held_while_training_and_released_after(world, tmp_path, monkeypatch):
    from gren.train import engine

    seen = {}
    real_fit = engine.fit

    def watching_fit(config, run_dir, data, resume=False):
        seen["locked"] = (Path(run_dir) / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(GrenError, match="holds its lock"):  # a second acquirer (another open file) is refused
            RunLock(run_dir).acquire()
        return real_fit(config, run_dir, data, resume=resume)

    monkeypatch.setattr(engine, "fit", watching_fit)
    engine.train(world["data"], "baseline", tmp_path / "r", protocol="0.5_0.8", fold=0, overrides=TINY_OVERRIDES)
    assert seen["locked"]
    RunLock(tmp_path / "r").acquire().release()  # free again


def test_a_symlinked_lock_file_is_refused(world, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    run = tmp_path / "r"
    run.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, run / ".lock")
    assert main(["train", "--data", str(world["data"]), *TRAIN, "--out", str(run), *TINY_OVERRIDES]) == 2
    assert "symbolic link" in _errors(caplog)[-1] and victim.read_text() == "precious"


# -- item 3: predict, crossval, split, report -----------------------------------------------------------------


def test_predict_refuses_an_out_that_holds_its_inputs(world, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    folder = tmp_path / "xrays"
    shutil.copytree(world["data"] / "images", folder)
    images = sorted(str(p) for p in folder.glob("*.png"))[:3]
    before = snapshot(tmp_path)
    assert main(["predict", *images, "--run", str(world["run"]), "--out", str(folder)]) == 2
    assert "holds input images" in _errors(caplog)[-1]
    assert snapshot(tmp_path) == before


def test_predict_never_replaces_files_it_did_not_write_nor_follows_links(world, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    image = sorted((world["data"] / "images").glob("*.png"))[0]
    out = tmp_path / "pred"
    out.mkdir()
    (out / f"{image.stem}.png").write_bytes(b"the user's own picture")
    before = snapshot(tmp_path)
    assert main(["predict", str(image), "--run", str(world["run"]), "--out", str(out)]) == 2
    assert "which gren did not write" in _errors(caplog)[-1] and f"{image.stem}.png" in _errors(caplog)[-1]
    assert snapshot(tmp_path) == before

    (out / f"{image.stem}.png").unlink()
    assert main(["predict", str(image), "--run", str(world["run"]), "--out", str(out)]) == 0
    manifest = json.loads((out / OUTPUTS_MANIFEST).read_text())["files"]
    assert manifest == {f"{image.stem}.json": "gren predict", f"{image.stem}.png": "gren predict",
                        "regions.csv": "gren predict", "regions.coco.json": "gren predict"}
    assert main(["predict", str(image), "--run", str(world["run"]), "--out", str(out)]) == 0  # its own: replaced

    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    (out / f"{image.stem}.png").unlink()
    os.symlink(victim, out / f"{image.stem}.png")  # planted where predict writes, even a name it wrote
    before = snapshot(tmp_path)
    assert main(["predict", str(image), "--run", str(world["run"]), "--out", str(out)]) == 2
    assert "symbolic link" in _errors(caplog)[-1]
    assert snapshot(tmp_path) == before and victim.read_bytes() == b"precious"


def test_atomic_writes_replace_a_link_and_use_unique_temporary_names(tmp_path):
    from gren.core.atomic import atomic_path, unique_temp_path, write_text_atomic
    from gren.core.checkpoint import load_checkpoint, save_checkpoint

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "out.txt")
    write_text_atomic(tmp_path / "out.txt", "new")
    assert not (tmp_path / "out.txt").is_symlink() and (tmp_path / "out.txt").read_text() == "new"
    assert victim.read_text() == "precious"

    target = tmp_path / "last.pt"
    with atomic_path(target) as first, atomic_path(target) as second:  # two writers at once
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("one")
        second.write_text("two")
    assert target.read_text() == "one"  # the outer one replaced last
    save_checkpoint(target, model={"w": torch.ones(2)}, config={}, epoch=1)  # its temp name is unique too
    assert load_checkpoint(target)["epoch"] == 1
    names = {unique_temp_path(target) for _ in range(3)}
    assert len(names) == 3 and all(n.name.startswith(".last.pt.") for n in names)
    for name in names:
        name.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "out.txt", "victim.txt"]  # no temp left


def test_crossval_refuses_tables_it_did_not_write(tmp_path, caplog):
    from gren.eval.crossval import run_crossval, write_tables
    from test_crossval import FakeEngine

    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "cv"
    out.mkdir()
    (out / "table.md").write_text("my own table\n")
    before = snapshot(tmp_path)
    engine = FakeEngine()
    with pytest.raises(GrenError, match="would replace table.md, which gren did not write"):
        run_crossval(data, "baseline", out, protocol="0.5_0.8", folds=2, train_fn=engine.train,
                     evaluate_fn=engine.evaluate, progress=False)
    assert engine.trained == [] and snapshot(tmp_path) == before
    with pytest.raises(GrenError, match="leaves none to test"):
        run_crossval(data, "baseline", tmp_path / "cv2", protocol="all", folds=2, train_fn=engine.train,
                     evaluate_fn=engine.evaluate, progress=False)
    (out / "table.md").write_text("# Cross-validation: written by an older gren\n")  # recognised: replaced, warned
    caplog.set_level(logging.WARNING)
    summary = run_crossval(data, "baseline", out, protocol="0.5_0.8", folds=2, train_fn=engine.train,
                           evaluate_fn=engine.evaluate, progress=False)
    assert summary["trained"] == [("baseline", 0), ("baseline", 1)]
    assert "written by gren before output manifests existed" in caplog.text
    assert (out / "table.md").read_text().startswith("# Cross-validation: protocol 0.5_0.8")
    write_tables(out)  # its own now (manifest): no warning needed


def test_data_split_refuses_foreign_files_and_warns_when_replacing_a_split(world, tmp_path, caplog):
    data = make_dataset(tmp_path / "data", n=12, size=40)
    out = tmp_path / "split"
    out.mkdir()
    (out / "split.json").write_text('{"my": "settings"}')
    before = snapshot(tmp_path, skip=())
    caplog.set_level(logging.WARNING)
    argv = ["data", "split", "--data", str(data), "--protocol", "0.5_0.5", "--folds", "3", "--out", str(out)]
    assert main(argv) == 2
    assert "would replace split.json, which gren did not write" in _errors(caplog)[-1]
    assert snapshot(tmp_path, skip=()) == before
    (out / "split.json").unlink()
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [OUTPUTS_MANIFEST, "fold_0.csv", "fold_1.csv", "fold_2.csv",
                                                      "split.json"]
    caplog.clear()
    assert main(["data", "split", "--data", str(data), "--protocol", "0.5_0.5", "--folds", "2", "--seed", "4",
                 "--out", str(out)]) == 0
    assert "replacing an earlier split (folds 3 -> 2; seed 0 -> 4)" in caplog.text
    assert "fold_2.csv: removed, left by an earlier split with more folds" in caplog.text
    assert not (out / "fold_2.csv").exists() and json.loads((out / "split.json").read_text())["folds"] == 2


def test_report_refuses_figures_it_did_not_write(world, tmp_path, caplog):
    import numpy as np
    from PIL import Image

    caplog.set_level(logging.ERROR)
    out = tmp_path / "figures"
    out.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(out / "localization.png")  # not a matplotlib figure
    before = snapshot(tmp_path)
    assert main(["report", "--runs", str(world["run"]), "--out", str(out)]) == 2
    assert "would replace localization.png, which gren did not write" in _errors(caplog)[-1]
    assert snapshot(tmp_path) == before


# -- item 5: numbers stay finite -------------------------------------------------------------------------------


def test_a_nan_weight_is_caught_before_the_checkpoint_is_written(tmp_path):
    from _train_fakes import FakeLesionDataset, small_config
    from gren.methods.baseline import Baseline
    from gren.methods.registry import register_method, unregister_method
    from gren.train.engine import TrainingData, fit

    class Poisoned(Baseline):
        def on_step_end(self, context):
            with torch.no_grad():
                next(self.parameters()).fill_(float("nan"))

    register_method("poisoned-test")(Poisoned)
    try:
        config = small_config(train={"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 1})
        config["method"] = "poisoned-test"
        dataset = FakeLesionDataset(n=8, n_annotated=4)
        with pytest.raises(GrenError, match="epoch 1: 1 parameter tensors are not finite.*nothing was saved"):
            fit(config, tmp_path / "run", TrainingData(dataset, dataset.annotated, dataset.unannotated))
    finally:
        unregister_method("poisoned-test")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_evaluate_and_predict_refuse_a_checkpoint_with_nan_weights(world, run_copy, tmp_path, caplog):
    from gren.core.checkpoint import load_checkpoint, save_checkpoint

    caplog.set_level(logging.ERROR)
    state = load_checkpoint(run_copy / "checkpoints" / "last.pt")
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and k.endswith("weight"))
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    bad = tmp_path / "nan.pt"
    save_checkpoint(bad, **state)
    before = snapshot(run_copy)
    assert main(["evaluate", "--run", str(run_copy), "--checkpoint", str(bad)]) == 2
    assert "non-finite maps or scores" in _errors(caplog)[-1]
    assert snapshot(run_copy) == before  # no eval.json
    image = sorted((world["data"] / "images").glob("*.png"))[0]
    out = tmp_path / "pred"
    assert main(["predict", str(image), "--checkpoint", str(bad), "--out", str(out)]) == 2
    assert "non-finite maps or scores" in _errors(caplog)[-1]
    assert not (out / f"{image.stem}.json").exists() and not (out / f"{image.stem}.png").exists()


def test_optim_lr_nan_never_reaches_training(world, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    started = time.perf_counter()
    assert main(["train", "--data", str(world["data"]), *TRAIN, "--out", str(tmp_path / "r"), *TINY_OVERRIDES,
                 "optim.lr=nan"]) == 2
    assert "optim.lr must be a number > 0, got nan" in _errors(caplog)[-1]
    assert not (tmp_path / "r").exists() and time.perf_counter() - started < 10


def test_two_trainings_started_together_into_one_folder_one_refused(world, tmp_path):
    """The issue's race: both exited 0, one's config and split with the other's checkpoints. Now exactly one
    trains; the other stops (the lock, or the finished run) and the folder holds one run's files."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    run = tmp_path / "shared"
    commands = [[sys.executable, "-m", "gren.cli", "train", "--data", str(world["data"]), "--method", method,
                 "--protocol", "0.5_0.8", "--fold", str(fold), "--out", str(run), *TINY_OVERRIDES]
                for method, fold in (("baseline", 0), ("gren", 1))]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in commands]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "holds its lock" in loser or "already holds a trained run" in loser
    winner = next(i for i, (code, _) in enumerate(results) if code == 0)
    method = ("baseline", "gren")[winner]
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert config["method"] == method == checkpoint["config"]["method"] == read_run_marker(run)["method"]
    assert config["data"]["fold"] == checkpoint["config"]["data"]["fold"] == winner


def _ddp_train_worker(rank: int, port: int, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from _train_fakes import FakeLesionDataset
    from gren.core import dist
    from gren.train import engine

    assert dist.init_distributed(backend="gloo")
    dataset = FakeLesionDataset(n=8, n_annotated=4)
    engine.open_training_data = lambda *args, **kwargs: engine.TrainingData(dataset, dataset.annotated,
                                                                            dataset.unannotated)
    overrides = ["model.backbone=resnet18", "model.output_stride=16", "model.head_hidden=16", "data.size=64",
                 "data.workers=0", "device.device=cpu", "train.epochs=1", "train.max_steps_per_epoch=1"]
    try:
        engine.train("unused", "baseline", run_dir, overrides=overrides)  # rank 1 taking the lock would fail here
    finally:
        import torch.distributed as torch_dist

        torch_dist.destroy_process_group()


def test_under_ddp_only_rank_0_takes_the_run_lock(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "ddp"
    mp.spawn(_ddp_train_worker, args=(port, str(run)), nprocs=2, join=True)
    assert (run / "checkpoints" / "last.pt").is_file() and read_run_marker(run)["method"] == "baseline"
    assert not RunLock(run).is_held_elsewhere()
