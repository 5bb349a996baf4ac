"""Regenerate BENCHMARKS.md from the figures the benchmark scripts wrote to benchmarks/results/.

    python benchmarks/make_report.py            # only assemble BENCHMARKS.md from existing results
    python benchmarks/make_report.py --run      # rerun every benchmark script first (long: see each script)
    python benchmarks/make_report.py --run --only phash,eval

Each benchmark script writes ``results/<name>.json`` (figures, machine, date) and ``results/<name>.md``
(a markdown section). This script runs them (``--run``) and concatenates the sections in a fixed order.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent

# (result name, script, one-line title) in the order they appear in BENCHMARKS.md
# In run order: a section that reads another's output (the hash-signal sections read the caches the
# cross-validations prepare) comes after it.
SECTIONS = [
    ("phash", "bench_phash.py", "Perceptual hash: ours vs imagehash"),
    ("phash_onednn_avx2", "ONEDNN_MAX_CPU_ISA=AVX2 bench_phash.py --name phash_onednn_avx2",
     "Perceptual hash with oneDNN held to AVX2"),
    ("hash_signal", "hash_signal.py", "Does the lung hash carry the signal GREN assumes?"),
    ("lungs", "bench_lungs.py", "Lung segmentation Dice on real films"),
    ("shipped_lungs", "train_shipped_lungs.py --parts cv", "The shipped lung U-Net: cross-validated Dice"),
    ("lung_flags", "bench_lungs.py --parts flags", "Gross-failure flags of the lung segmenters"),
    ("backbones", "bench_backbones.py", "Backbones: ResNet-18 vs EfficientNet-Lite0 training step"),
    ("synth", "bench_synth.py", "Synthetic data generator speed"),
    ("prepare", "bench_prepare.py", "`gren prepare`: cached loading vs on-the-fly decoding"),
    ("train_step", "bench_train_step.py", "Training step: baseline vs GREN variants"),
    ("method_steps", "bench_method_steps.py", "Training step of the peer methods (CCG, B+Attention) vs the baseline"),
    ("ham_iam", "bench_ham_iam.py", "HAM and iterative attention mining: step cost, memory, IAM's total cost"),
    ("eval", "bench_eval.py", "Evaluation speed"),
    ("demo", "bench_demo.py", "`gren demo` end to end"),
    ("protocol_port", "compare_eval.py /tmp/demo-orig /tmp/demo-new",
     "The method protocol port: the demo's eval.json before and after"),
    ("synthetic_crossval", "exp_synthetic_crossval.py --out runs/synthetic-crossval "
     "--explore 'gren-intra lambda x10;gren paper form, lambda x10'", "Synthetic default: 5-fold ablation table"),
    ("synthetic_crossval_large", "exp_synthetic_crossval.py --out runs/synthetic-large --n 4000 "
     "--name synthetic_crossval_large --explore 'gren-intra lambda x10;gren paper form, lambda x10'",
     "Synthetic, 4,000 films: 5-fold ablation table"),
    ("hash_signal_synthetic", "hash_signal_cache.py --cache runs/synthetic-crossval/cache",
     "Hash signal in the synthetic demo's cache"),
    ("gren_gradients", "exp_gren_gradients.py", "Why GREN trains like the baseline: gradient norms"),
    ("gren_selection", "exp_gren_selection.py", "GREN settings chosen on a separate synthetic dataset"),
    ("gren_selection_round2", "exp_gren_selection.py --round2", "GREN settings, round 2: five folds"),
    ("nih_sample", "exp_nih_sample.py", "Real NIH sample: baseline vs GREN"),
    ("hash_signal_nih_cache", "hash_signal_cache.py --cache runs/nih-sample/cache128 --name hash_signal_nih_cache",
     "Hash signal in the NIH sample's 128 px cache"),
    ("nih_sample_long", "exp_nih_sample.py --epochs 32 --annotated-fraction 0.5 --name nih_sample_long "
     "--out runs/nih-sample-long --no-selected", "Real NIH sample, the one-hour CPU configuration"),
]

GPU_NOTE = (
    "## GPU\n\nNo GPU machine was lent to the sessions that produced these figures, so nothing here was "
    "measured on a GPU. The GPU configurations are ready: `python benchmarks/bench_train_step.py --gpu` "
    "(images/s of baseline and GREN at 512 px / ResNet-50, bf16, channels_last, compile on and off) and "
    "`python benchmarks/exp_nih_sample.py --gpu --folds 0,1,2,3,4` (the paper's setting on the NIH sample). "
    "Full NIH at the paper's setting (ResNet-50, 512 px, 9 epochs, batch 4: the default config) is README's "
    "\"Using the real NIH ChestX-ray14\" recipe: `gren prepare --data NIH --out cache512 --size 512`, then "
    "`gren crossval --data cache512 --methods baseline,gren-intra,gren-inter,gren,gren-cosine --protocol 0.5_0.8 "
    "--folds 5 --out nih-0.5_0.8 model.weights=imagenet`."
)

log = logging.getLogger("benchmarks")


def _versions() -> str:
    parts = [f"Python {platform.python_version()}"]
    for name in ("torch", "torchvision", "numpy", "pillow", "imagehash"):
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(parts)


def _shift_headings(text: str, top: int) -> str:
    """Shift the markdown headings of ``text`` (outside code fences) so the highest is level ``top``."""
    lines = text.splitlines()
    in_code, levels = False, []
    for line in lines:
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            levels.append(len(line) - len(line.lstrip("#")))
    if not levels:
        return text
    shift, out, in_code = top - min(levels), [], False
    for line in lines:
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            line = "#" * max(1, len(line) - len(line.lstrip("#")) + shift) + line.lstrip("#")
        out.append(line)
    return "\n".join(out)


def _nest_headings(text: str, title: str) -> str:
    """A result file as one ``##`` section of BENCHMARKS.md, its own headings nested below."""
    if text.startswith("#"):
        return _shift_headings(text, 2)
    return f"## {title}\n\n" + _shift_headings(text, 3)


def run_scripts(only: set[str] | None) -> None:
    for name, script, _ in SECTIONS:
        if only and name not in only:
            continue
        words = shlex.split(script)
        env = dict(os.environ)
        while words and "=" in words[0] and not words[0].endswith(".py"):  # NAME=VALUE prefixes set the environment
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        script_name, *script_args = words
        path = HERE / script_name
        if not path.exists():
            log.warning("no script %s; skipping %s", script_name, name)
            continue
        log.info("running %s", script)
        subprocess.run([sys.executable, str(path), *script_args], check=True, cwd=ROOT, env=env)


def assemble() -> str:
    lines = [
        "# Benchmarks",
        "",
        "Every figure here is written by a script in `benchmarks/` to `benchmarks/results/` and assembled by",
        "`python benchmarks/make_report.py` (add `--run` to rerun them all). Each section names the machine and",
        "date it was measured on; ratios are measured side by side in one run.",
        "",
        f"Assembled {datetime.now(timezone.utc).strftime('%Y-%m-%d')} with {_versions()}.",
        "",
    ]
    missing = []
    for name, script, title in SECTIONS:
        md = RESULTS / f"{name}.md"
        if not md.exists():
            missing.append(f"* {title}: not measured yet (`python benchmarks/{script}`)")
            continue
        text = _nest_headings(md.read_text().strip(), title)
        meta = RESULTS / f"{name}.json"
        if meta.exists():
            try:
                info = json.loads(meta.read_text())
                machine = info.get("machine") or info.get("meta", {}).get("machine")
                date = info.get("date") or info.get("meta", {}).get("date")
                if isinstance(machine, dict):
                    machine = ", ".join(f"{k} {v}" for k, v in machine.items() if k in ("platform", "cpus", "cpu"))
                if machine or date:
                    text += f"\n\n<sub>Measured on {machine or '?'}, {date or '?'}; figures in `benchmarks/results/{name}.json`; rerun: `python benchmarks/{script}`.</sub>"
            except json.JSONDecodeError:
                pass
        lines += [text, ""]
    train_step = RESULTS / "train_step.json"
    if not (train_step.exists() and json.loads(train_step.read_text()).get("gpu")):
        lines += [GPU_NOTE, ""]
    if missing:
        lines += ["## Not yet measured", "", *missing, ""]
    return "\n".join(lines)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="rerun the benchmark scripts first")
    parser.add_argument("--only", default="", help="comma-separated result names to rerun (with --run)")
    args = parser.parse_args()
    if args.run:
        run_scripts(set(filter(None, args.only.split(","))) or None)
    out = ROOT / "BENCHMARKS.md"
    out.write_text(assemble())
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
