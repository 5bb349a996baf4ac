"""``gren methods``: the registered localization methods (built in and from plugins), what they need and
their config defaults."""

from __future__ import annotations

import argparse
import json

GROUP = None
NAME = "methods"
HELP = "list the registered methods: what each needs, its config sections and defaults"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--defaults", action="store_true", help="also print each method's own config defaults (YAML)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def describe() -> list[dict]:
    """One dict per registered method: name, module, summary, needs, eval rules, default sections."""
    from gren.methods import METHODS, method_defaults

    rows = []
    for name in sorted(METHODS):
        cls = METHODS[name]
        doc = (cls.__doc__ or "").strip().splitlines()
        rows.append({"name": name, "module": cls.__module__, "summary": doc[0] if doc else "",
                     "needs": sorted(cls.needs), "eval_rules": ["cells", *cls.eval_rules],
                     "defaults": method_defaults(name)})
    return rows


def run(args: argparse.Namespace) -> int:
    import yaml

    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        sections = ", ".join(row["defaults"]) or "-"
        print(f"{row['name']:<{width}}  {row['summary']}")
        print(f"{'':<{width}}  needs: {', '.join(row['needs'])}; config: {sections}; rules: "
              f"{', '.join(row['eval_rules'])}; from {row['module']}")
        if args.defaults and row["defaults"]:
            for line in yaml.safe_dump(row["defaults"], sort_keys=False).splitlines():
                print(f"{'':<{width}}    {line}")
    return 0
