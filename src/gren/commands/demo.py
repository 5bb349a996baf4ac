"""``gren demo``: synthesise -> prepare -> train baseline and GREN -> evaluate -> table and figures."""

from __future__ import annotations

import argparse

GROUP = None
NAME = "demo"
HELP = "end-to-end demo on synthetic data (CPU, minutes): baseline vs GREN table and figures"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="gren-demo", metavar="DIR", help="output folder (./gren-demo); "
                        "rerunning resumes and skips finished steps")
    parser.add_argument("--n", type=int, default=None, metavar="N",
                        help="number of synthetic images (800; 120 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny setting (64 px, one short epoch): a smoke test")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from gren.eval.demo import DemoSettings, run_demo

    if args.quick:
        settings = DemoSettings.quick(args.n)
    else:
        settings = DemoSettings() if args.n is None else replace(DemoSettings(), n=args.n)
    summary = run_demo(args.out, settings)
    with open(summary["table_md"]) as handle:
        print(handle.read())
    print("where everything is:")
    print(f"  synthetic data   {summary['data']}")
    print(f"  prepared cache   {summary['cache']}")
    for method, path in summary["runs"].items():
        print(f"  run {method:<12} {path}  (eval.json, eval.md, metrics.jsonl, tb/)")
    print(f"  ablation table   {summary['table_md']}, {summary['table_csv']}")
    for figure in summary["figures"]:
        print(f"  figure           {figure}")
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items())
    print(f"  time             {timing}")
    return 0
