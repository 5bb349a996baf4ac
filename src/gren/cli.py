"""The ``gren`` command line.

Each command lives in its own module under :mod:`gren.commands` and is discovered at start-up.
A command module defines:

* ``GROUP``: ``None`` for a top-level command (``gren train``) or a group name (``"data"`` for
  ``gren data synth``);
* ``NAME`` and ``HELP``: the sub-command name and its one-line help;
* ``add_arguments(parser)``: adds its options to an :class:`argparse.ArgumentParser`;
* ``run(args) -> int``: does the work and returns the exit status.

So a new command is one new file; nothing here needs editing.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

import gren
import gren.commands
from gren.core.errors import GrenError

log = logging.getLogger("gren")

GROUP_HELP = {
    "data": "NIH-layout datasets: synthesise, check, split",
    "lungs": "left/right lung segmentation: train, evaluate, preview",
}


def _command_modules():
    for info in sorted(pkgutil.iter_modules(gren.commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"gren.commands.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            yield module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gren",
        description="GREN: weakly-supervised disease localization in chest X-rays.",
    )
    parser.add_argument("--version", action="version", version=f"gren {gren.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for module in _command_modules():
        group = getattr(module, "GROUP", None)
        if group is None:
            sub = top.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        else:
            if group not in groups:
                gp = top.add_parser(group, help=GROUP_HELP.get(group, group), description=GROUP_HELP.get(group))
                groups[group] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
                gp.set_defaults(_group_parser=gp)
            sub = groups[group].add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Logging levels for ``-q`` / default / ``-v`` / ``-vv``.

    * ``-q``: warnings and errors only; no progress bars or progress lines (:mod:`gren.core.progress`
      reports at INFO);
    * default: INFO (what is done, counts, progress lines in batch logs);
    * ``-v``: DEBUG from gren's own modules (per-file details such as duplicate stems), INFO elsewhere;
    * ``-vv``: DEBUG from every library too, with the process id in each line (worker pools, DDP ranks).

    Sets the levels every call (so repeated in-process :func:`main` calls get what they ask for) and
    adds a stderr handler only when the root logger has none.
    """
    if quiet:
        root_level, gren_level = logging.WARNING, logging.NOTSET
    elif verbose >= 2:
        root_level, gren_level = logging.DEBUG, logging.NOTSET
    elif verbose == 1:
        root_level, gren_level = logging.INFO, logging.DEBUG
    else:
        root_level, gren_level = logging.INFO, logging.NOTSET
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        root.addHandler(handler)
    fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    if verbose >= 2 and not quiet:
        fmt = "%(asctime)s %(levelname)-7s [%(process)d] %(name)s:%(lineno)d: %(message)s"
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (sys.stderr, sys.stdout):
            handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root.setLevel(root_level)
    log.setLevel(gren_level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key=value overrides after an option (train --out R optim.lr=0.1): argparse fills a positional
        # nargs="*" only once, so the later ones come back unparsed.
        if hasattr(args, "overrides") and all("=" in token and not token.startswith("-") for token in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.verbose, args.quiet)
    if getattr(args, "_run", None) is None:
        (getattr(args, "_group_parser", None) or parser).print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except GrenError as err:
        log.error("%s", err)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
