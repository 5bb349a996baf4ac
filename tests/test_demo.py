"""`gren demo` at a tiny setting: every step runs, the table and eval.json files exist and parse, reruns skip."""

from __future__ import annotations

import csv
import json
import logging

from gren.cli import main
from gren.core.labels import BOX_CLASSES


def test_demo_quick_end_to_end_and_resume(tmp_path, capsys, caplog):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--n", "48", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| T(IoU) | Model |" in printed and "where everything is" in printed
    for method in ("baseline", "gren"):
        result = json.loads((out / "ablation" / method / "fold_0" / "eval.json").read_text())
        assert list(result["accuracy"]) == [*BOX_CLASSES, "mean"] and result["method"] == method
        assert sum(result["n_boxes"].values()) > 0
    table = (out / "ablation" / "table.md").read_text()
    assert table.count("| 0.5 | baseline |") == 2 and table.count("| 0.5 | gren |") == 2  # accuracy + IoBB
    rows = list(csv.DictReader((out / "ablation" / "table.csv").open()))
    assert {r["method"] for r in rows} == {"baseline", "gren"} and len(rows) == 2 * 2 * 4 + 2
    for name in ("training_curves.png", "hash_similarity.png", "localization.png"):
        assert (out / "figures" / name).stat().st_size > 1000

    # a demo run evaluates standalone: the data comes from the run's config (data.path)
    assert main(["evaluate", "--run", str(out / "ablation" / "gren" / "fold_0"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_boxes"] == result["n_boxes"]

    # rerun: nothing is trained again
    mtime = (out / "ablation" / "gren" / "fold_0" / "checkpoints" / "last.pt").stat().st_mtime_ns
    from gren.eval.demo import DemoSettings, run_demo

    summary = run_demo(out, DemoSettings.quick(48), progress=False)
    assert summary["trained"] == []
    assert (out / "ablation" / "gren" / "fold_0" / "checkpoints" / "last.pt").stat().st_mtime_ns == mtime

    # the same folder with another image count is refused, not silently reused
    with caplog.at_level(logging.ERROR, logger="gren.cli"):
        assert main(["demo", "--quick", "--n", "60", "--out", str(out)]) == 2
    assert any("n=48" in r.getMessage() and "other settings" in r.getMessage() for r in caplog.records)
