"""`gren crossval`: resumability (a second call trains nothing), half-trained pairs resume, table layout."""

from __future__ import annotations

import csv
import io
import json

import pytest

from gren.core.errors import GrenError
from gren.core.labels import BOX_CLASSES, LABELS
from gren.eval.crossval import collect_results, run_crossval, write_tables
from gren.eval.evaluate import write_eval
from gren.eval.table import csv_table, markdown_table


def fake_eval(acc: float, auc: float, missing: str | None = None) -> dict:
    per_t = {"0.1": acc, "0.3": acc, "0.5": acc, "0.7": acc}
    accuracy = {c: dict(per_t) for c in BOX_CLASSES}
    if missing:
        accuracy[missing] = {k: None for k in per_t}
    accuracy["mean"] = dict(per_t)
    return {"accuracy": accuracy, "iobb": accuracy, "auc": {**{lab: auc for lab in LABELS}, "mean": auc},
            "n_boxes": {c: 1 for c in BOX_CLASSES}}


class FakeEngine:
    """Records calls; 'training' writes config.yaml and a checkpoint, 'evaluation' an eval.json."""

    def __init__(self):
        self.trained, self.evaluated = [], []

    def train(self, data, method, out, *, protocol, fold, config_file, overrides, resume):
        self.trained.append((method, fold, resume, tuple(overrides)))
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(f"method: {method}\n")
        (out / "checkpoints" / "last.pt").write_bytes(b"x")

    def evaluate(self, run_dir, data, batch_size, progress):
        method, fold = run_dir.parent.name, int(run_dir.name.split("_")[1])
        self.evaluated.append((method, fold))
        acc = {"baseline": 0.2, "gren": 0.5}[method] + 0.1 * fold
        write_eval(run_dir, {**fake_eval(acc, 0.6 + 0.01 * fold), "method": method})


def test_crossval_resumes_and_skips(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "cv"
    engine = FakeEngine()
    summary = run_crossval(data, "baseline,gren", out, protocol="0.5_0.8", folds=3, overrides=["optim.lr=0.01"],
                           train_fn=engine.train, evaluate_fn=engine.evaluate, progress=False)
    assert len(summary["trained"]) == 6 and not summary["skipped"]
    assert all(not resume for _, _, resume, _ in engine.trained)
    assert engine.trained[0][3] == ("optim.lr=0.01", "data.folds=3")
    assert (out / "table.md").is_file() and (out / "table.csv").is_file()

    # second call: nothing trained, nothing evaluated
    again = FakeEngine()
    summary = run_crossval(data, "baseline,gren", out, protocol="0.5_0.8", folds=3, overrides=["optim.lr=0.01"],
                           train_fn=again.train, evaluate_fn=again.evaluate, progress=False)
    assert again.trained == [] and again.evaluated == [] and len(summary["skipped"]) == 6

    # a half-trained pair (config + checkpoint, no eval.json) is resumed, the rest skipped
    (out / "gren" / "fold_1" / "eval.json").unlink()
    third = FakeEngine()
    run_crossval(data, "baseline,gren", out, protocol="0.5_0.8", folds=3, overrides=["optim.lr=0.01"],
                 train_fn=third.train, evaluate_fn=third.evaluate, progress=False)
    assert [(m, f, r) for m, f, r, _ in third.trained] == [("gren", 1, True)]

    # other settings in the same folder are refused
    with pytest.raises(GrenError, match="other settings"):
        run_crossval(data, "gren", out, protocol="1.0_0.4", folds=3, overrides=["optim.lr=0.01"],
                     train_fn=third.train, evaluate_fn=third.evaluate)


def test_table_layout_mean_std_over_folds(tmp_path):
    results = {"baseline": [fake_eval(0.2, 0.6), fake_eval(0.4, 0.8)], "gren": [fake_eval(0.5, 0.65, missing="Nodule")]}
    text = markdown_table(results, title="t")
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| T(IoU)"))
    assert header == "| T(IoU) | Model | " + " | ".join(BOX_CLASSES) + " | Mean |"
    rows_05 = [line for line in lines if line.startswith("| 0.5 |")]
    assert len(rows_05) == 4  # accuracy + IoBB blocks, two methods each
    assert rows_05[0].startswith("| 0.5 | baseline | 0.30 ± 0.14 |")
    assert rows_05[1].startswith("| 0.5 | gren | **0.50** |")  # one fold: no ±; best of the block in bold
    assert rows_05[1].split(" | ")[7] == "-"  # Nodule had no boxes in gren's only fold
    auc_rows = [line for line in lines if line.startswith("| baseline |") or line.startswith("| gren |")]
    assert auc_rows[0].endswith("| **0.70 ± 0.14** |") and auc_rows[1].endswith("| 0.65 |")

    table = list(csv.DictReader(io.StringIO(csv_table(results))))
    assert len(table) == 2 * 4 * 2 + 2
    first = table[0]
    assert (first["block"], first["T"], first["method"]) == ("accuracy", "0.1", "baseline")
    assert float(first["Atelectasis"]) == pytest.approx(0.3) and float(first["mean_std"]) == pytest.approx(0.1414, 1e-3)
    gren_nodule = next(r for r in table if r["method"] == "gren" and r["block"] == "accuracy")
    assert gren_nodule["Nodule"] == "" and gren_nodule["Nodule_n"] == "0"


def test_table_only_rebuilds_from_runs(tmp_path):
    for method, acc in (("gren", 0.5), ("baseline", 0.1)):
        for fold in (0, 1):
            run = tmp_path / method / f"fold_{fold}"
            run.mkdir(parents=True)
            write_eval(run, fake_eval(acc, 0.5))
    (tmp_path / "crossval.json").write_text(json.dumps({"methods": ["baseline", "gren"], "protocol": "0.5_0.8", "folds": 2}))
    results = write_tables(tmp_path)
    assert list(results) == ["baseline", "gren"] and len(results["gren"]) == 2
    assert "protocol 0.5_0.8, 2 folds" in (tmp_path / "table.md").read_text()
    assert list(collect_results(tmp_path, ["gren"])) == ["gren"]
    with pytest.raises(GrenError, match="no evaluated runs"):
        write_tables(tmp_path / "empty")


@pytest.mark.parametrize("methods, protocol, overrides, message", [
    ("baseline,no-such-method", "0.5_0.8", [], "unknown method.*no-such-method.*registered: .*baseline"),
    ("baseline", "1.0_x", [], "not of the form X_Y"),
    ("baseline", "0.5_0.8", ["optim.no_such_key=1"], "no_such_key"),
])
def test_bad_settings_are_refused_before_any_training(tmp_path, methods, protocol, overrides, message):
    data = tmp_path / "data"
    data.mkdir()
    engine = FakeEngine()
    with pytest.raises(GrenError, match=message):
        run_crossval(data, methods, tmp_path / "cv", protocol=protocol, folds=3, overrides=overrides,
                     train_fn=engine.train, evaluate_fn=engine.evaluate, progress=False)
    assert engine.trained == [] and not (tmp_path / "cv").exists()
