"""Evaluation: running trained models over test splits, tables, figures.

Modules: :mod:`.evaluate` (a run -> eval.json / eval.md), :mod:`.table` (Table I layout),
:mod:`.crossval` (methods x folds, resumable), :mod:`.predict` (image files -> JSON + overlays),
:mod:`.report` (figures), :mod:`.demo` (the end-to-end synthetic demo). The metric itself is in
:mod:`gren.metrics`; docs/evaluation.md describes all of it.
"""
