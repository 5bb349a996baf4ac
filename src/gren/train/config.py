"""Training configuration: the bundled YAML defaults, a user YAML on top, then ``key=value`` overrides.

``resolve_config(config_file, overrides)`` returns a plain nested dict:

1. ``gren/configs/default.yaml`` (the shared settings: model, data, train, optim, device);
   then the method's own ``defaults`` (its sections such as ``loss`` or ``graph``, and any shared key it
   sets differently; :func:`gren.methods.method_defaults`). Without a method (``method=None``) every
   registered method's sections are merged, so any key of any method is valid;
2. ``config_file``: a path, or the name of a bundled config (``cpu-small``), holding a subset of the
   default keys;
3. ``overrides``: ``"section.key=value"`` strings, the value parsed as a YAML scalar
   (``optim.lr=1e-2``, ``model.weights=none``, ``data.annotated_fraction=null``).

Unknown keys are an error that lists the valid ones; nothing is silently ignored. The one exception is
``foreign="drop"`` (``gren crossval`` over several methods): a key that belongs to another registered
method's section (``graph.lambda_intra`` when training ``baseline``) is left out for this method.

**Validation** (before any data is read): every value from a config file or an override is checked
against a typed schema, and a bad one is a :class:`GrenError` naming where it came from, the key, what
was expected and what was given (one line, exit 2 on the command line):

* types come from the defaults: a key whose default is an integer takes whole numbers only (``2`` or
  ``2.0``, not ``1.5``, not ``true``), a float key finite numbers (not ``nan``, ``inf`` or ``true``), a
  boolean key ``true``/``false``, a text key text; lists and mappings are refused where the default is a
  single value;
* :class:`Rule` adds what a type cannot say: choices, ranges (``ge``/``gt``/``le``/``lt``), ``null``
  allowed, a check function. :data:`SCHEMA` holds the rules of the shared keys
  (``configs/default.yaml``); a method declares rules for its own keys (and may tighten shared ones) in
  its ``schema`` class attribute, ``{"graph.form": Rule(choices=("pull", "paper", "contrastive"))}``,
  merged over its base classes like ``defaults`` (:func:`config_schema`);
* after merging, :func:`validate_config` checks what involves several keys (``data.fold`` below
  ``data.folds``).
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import yaml

from gren.core.atomic import write_text_atomic
from gren.core.errors import GrenError
from gren.core.schema import Rule
from gren.core.schema import show_value as _show


def bundled_configs() -> list[str]:
    """Names of the configs shipped in ``gren/configs`` (``default``, ``cpu-small``, ...)."""
    root = resources.files("gren") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _config_path(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    text = str(name_or_path)
    if text in bundled_configs():
        return Path(str(resources.files("gren") / "configs" / f"{text}.yaml"))
    raise GrenError(f"config {text!r} not found: neither a file nor a bundled config ({', '.join(bundled_configs())})")


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping; a parse error names the file and line."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        line = err.problem_mark.line + 1 if err.problem_mark is not None else "?"
        raise GrenError(f"{path}:{line}: invalid YAML: {err.problem}") from None
    except OSError as err:
        raise GrenError(f"cannot read config {path}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GrenError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def shared_defaults() -> dict:
    """``configs/default.yaml`` alone (no method sections)."""
    return load_yaml(_config_path("default"))


def default_config(method: str | None = None) -> dict:
    """The defaults for ``method`` (shared + its own), or, with ``None``, shared + every method's sections."""
    from gren.methods.protocol import deep_update
    from gren.methods.registry import all_method_defaults, method_defaults

    config = shared_defaults()
    if method is not None:
        return deep_update(config, method_defaults(method))
    for defaults in all_method_defaults().values():
        _add_missing(config, defaults)
    return config


def _add_missing(base: dict, extra: dict) -> None:
    """Add the keys of ``extra`` that ``base`` lacks (recursively, in place); existing values are kept."""
    for key, value in extra.items():
        if key not in base:
            base[key] = copy.deepcopy(value)
        elif isinstance(base[key], dict) and isinstance(value, dict):
            _add_missing(base[key], value)


def foreign_keys(config: dict) -> set[str]:
    """Dotted keys that some registered method declares but ``config`` (one method's) does not have."""
    own = set(flat_keys(config))
    return set(flat_keys(default_config(None))) - own


def _drop_foreign(update: dict, foreign: set[str], prefix: str = "") -> dict:
    out = {}
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            if any(k == dotted or k.startswith(dotted + ".") for k in foreign) and \
                    all(f"{dotted}.{leaf}" in foreign for leaf in flat_keys(value)):
                continue
            out[key] = _drop_foreign(value, foreign, dotted + ".")
        elif dotted not in foreign:
            out[key] = value
    return out


def flat_keys(config: dict, prefix: str = "") -> list[str]:
    """All dotted leaf keys: ``["data.size", "optim.lr", ...]``."""
    keys = []
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            keys.extend(flat_keys(value, dotted + "."))
        else:
            keys.append(dotted)
    return keys


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check_device(value) -> str | None:
    return None if _DEVICE_RE.match(str(value).strip()) else "expected auto, cpu, cuda or cuda:N"


def _check_protocol(value) -> str | None:
    from gren.data.splits import parse_protocol

    try:
        parse_protocol(str(value))
    except GrenError as err:
        return str(err)
    return None


def _check_backbone(value) -> str | None:
    from gren.models.backbone import BACKBONES, TIMM_PREFIX

    text = str(value)
    if text in BACKBONES or (text.startswith(TIMM_PREFIX) and len(text) > len(TIMM_PREFIX)):
        return None
    return f"expected one of {', '.join(BACKBONES)} or {TIMM_PREFIX}NAME"


def _check_weights(value) -> str | None:
    text = str(value).strip()
    if text.lower() in ("none", "imagenet"):
        return None
    return None if Path(text).expanduser().is_file() else f"expected none, imagenet or a weights file; {text} not found"


def _check_lungs(value) -> str | None:
    text = str(value).strip()
    if text in ("auto", "masks", "classical"):
        return None
    if text.startswith("unet:"):
        path = Path(text[len("unet:"):]).expanduser()
        return None if path.is_file() else f"U-Net weights file {path} not found"
    return "expected auto, masks, classical or unet:PATH"


# The rules of the shared keys (configs/default.yaml); types come from the defaults. A method's own keys:
# its ``schema`` class attribute.
SCHEMA: dict[str, Rule] = {
    "method": Rule(type="str"),
    "seed": Rule(ge=0),
    "model.backbone": Rule(check=_check_backbone),
    "model.weights": Rule(check=_check_weights),
    "model.output_stride": Rule(choices=(8, 16, 32)),
    "model.normalization": Rule(choices=("auto", "gren", "imagenet", "timm", "xrv")),
    "model.upsample": Rule(ge=1),
    "model.predict_upsample": Rule(ge=1),
    "model.head_hidden": Rule(ge=1),
    "model.prior": Rule(gt=0, lt=1),
    "model.num_classes": Rule(ge=1),
    "data.path": Rule(type="str", nullable=True),
    "data.size": Rule(ge=16),
    "data.lungs": Rule(check=_check_lungs),
    "data.protocol": Rule(check=_check_protocol, expect="X_Y with fractions X, Y in [0, 1] (e.g. 0.5_0.8), or all"),
    "data.fold": Rule(ge=0),
    "data.folds": Rule(ge=1),
    "data.split_by": Rule(choices=("patient", "image")),
    "data.annotated_fraction": Rule(type="float", ge=0, le=1, nullable=True),
    "data.workers": Rule(ge=0),
    "train.epochs": Rule(ge=1),
    "train.batch_size": Rule(ge=1),
    "train.max_steps_per_epoch": Rule(type="int", ge=1, nullable=True),
    "train.log_every": Rule(ge=1),
    "train.keep_epochs": Rule(type="int", ge=0, nullable=True),
    "optim.name": Rule(choices=("sgd", "adamw", "adam")),
    "optim.lr": Rule(gt=0),
    "optim.momentum": Rule(ge=0, lt=1),
    "optim.weight_decay": Rule(ge=0),
    "optim.step_epochs": Rule(ge=1),
    "optim.gamma": Rule(gt=0, le=1),
    "device.device": Rule(check=_check_device),
    "device.amp": Rule(choices=("bf16", "none")),
}

# Keys that accept null (besides those whose default is null); kept for callers of the old name.
NULLABLE = tuple(key for key, rule in SCHEMA.items() if rule.nullable)


def method_schema(cls: type) -> dict[str, Rule]:
    """The ``schema`` of a method class merged over its bases (the most derived last)."""
    merged: dict[str, Rule] = {}
    for klass in reversed(cls.__mro__):
        own = klass.__dict__.get("schema")
        if own:
            merged.update(own)
    return merged


def config_schema(method: str | None = None) -> dict[str, Rule]:
    """:data:`SCHEMA` plus the rules of ``method`` (or, with ``None``, those of every registered method for
    the keys the shared schema does not cover)."""
    from gren.methods.registry import METHODS, discover, method_class

    schema = dict(SCHEMA)
    if method is not None:
        schema.update(method_schema(method_class(method)))
        return schema
    discover()
    for cls in METHODS.values():
        for key, rule in method_schema(cls).items():
            schema.setdefault(key, rule)
    return schema


def _kind(default, rule: Rule | None) -> str | None:
    if rule is not None and rule.type is not None:
        return rule.type
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, str):
        return "str"
    return None


def _coerce(default, value, key: str, source: str, schema: dict[str, Rule] | None = None):
    """``value`` checked and converted for ``key`` (whose default is ``default``); errors name ``source``."""
    rule = (SCHEMA if schema is None else schema).get(key)
    if isinstance(default, dict):
        raise GrenError(f"{source}: {key} is a section ({', '.join(default)}), not a value")
    if isinstance(value, dict):
        raise GrenError(f"{source}: {key} takes a value, not a mapping")
    if isinstance(value, (list, tuple, set)) and not isinstance(default, (list, tuple)):
        raise GrenError(f"{source}: {key} takes a single value, not a list ({value!r})")
    kind = _kind(default, rule)
    if value is None or (value == "None" and kind != "str"):
        if default is None or (rule is not None and rule.nullable):
            return None
        raise GrenError(f"{source}: {key} cannot be null (default {default!r})")
    expected = rule.describe(kind) if rule is not None else {"int": "a whole number", "float": "a number",
                                                             "bool": "true or false", "str": "text"}.get(kind, "")

    def bad(why: str = "") -> GrenError:
        return GrenError(f"{source}: {key} must be {expected}, got {_show(value)}" + (f" ({why})" if why else ""))

    if kind == "bool":
        if not isinstance(value, bool):
            raise GrenError(f"{source}: {key} must be true or false, got {_show(value)}")
    elif kind in ("int", "float"):
        number = value
        if isinstance(number, bool):
            raise bad()
        if isinstance(number, str):
            try:  # YAML 1.1 reads "1e-2" as a string
                number = float(number)
            except ValueError:
                raise GrenError(f"{source}: {key} must be a number, got {value!r}") from None
        if not isinstance(number, (int, float)):
            raise bad()
        if isinstance(number, float) and not math.isfinite(number):
            raise bad("not a finite number")
        if kind == "int":
            if isinstance(number, float):
                if not number.is_integer():
                    raise bad("not a whole number")
                number = int(number)
        else:
            number = float(number)
        value = number
    elif kind == "str":
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            value = str(value)
        if not isinstance(value, str):
            raise bad()
    if rule is not None:
        _check_rule(rule, kind, value, key, source, expected)
    return value


def _check_rule(rule: Rule, kind: str | None, value, key: str, source: str, expected: str) -> None:
    shown = _show(value)
    if rule.choices and value not in rule.choices:
        raise GrenError(f"{source}: {key} must be {expected}, got {shown}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for bound, ok in ((rule.ge, lambda v, b: v >= b), (rule.gt, lambda v, b: v > b),
                          (rule.le, lambda v, b: v <= b), (rule.lt, lambda v, b: v < b)):
            if bound is not None and not ok(value, bound):
                raise GrenError(f"{source}: {key} must be {expected}, got {shown}")
    if rule.check is not None:
        problem = rule.check(value)
        if problem:
            raise GrenError(f"{source}: {key}={shown}: {problem}")


def check_value(key: str, value, source: str, method: str | None = None, config: dict | None = None):
    """``value`` for the dotted ``key`` checked and converted as a config value from ``source`` (a command-line
    option such as ``--protocol``); returns the converted value."""
    node = config if config is not None else default_config(method)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return _coerce(node, value, key, source, config_schema(method))


def validate_config(config: dict, source: str = "config") -> dict:
    """Checks that involve several keys (each value was checked when it was set); returns ``config``."""
    data = config.get("data", {})
    if isinstance(data.get("fold"), int) and isinstance(data.get("folds"), int) and data["fold"] >= data["folds"]:
        raise GrenError(f"{source}: data.fold {data['fold']} out of range: data.folds is {data['folds']} "
                        f"(folds 0..{data['folds'] - 1})")
    return config


def merge_config(base: dict, update: dict, source: str, prefix: str = "",
                 schema: dict[str, Rule] | None = None) -> dict:
    """``base`` updated recursively by ``update``; keys absent from ``base`` are an error naming ``source``;
    values are checked against ``schema`` (default :data:`SCHEMA`)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in out:
            valid = ", ".join(flat_keys(base, prefix)) if prefix else ", ".join(base)
            raise GrenError(f"{source}: unknown config key {dotted!r}; valid keys here: {valid}")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge_config(out[key], value, source, dotted + ".", schema)
        else:
            out[key] = _coerce(out[key], value, dotted, source, schema)
    return out


def parse_override(text: str) -> tuple[str, object]:
    """``"optim.lr=0.01"`` -> ``("optim.lr", 0.01)`` (value parsed as a YAML scalar)."""
    if "=" not in text:
        raise GrenError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(config: dict, overrides: Iterable[str], schema: dict[str, Rule] | None = None) -> dict:
    """Apply ``key=value`` strings to a copy of ``config``; unknown keys list the valid ones; values are
    checked against ``schema`` (default :data:`SCHEMA`)."""
    out = copy.deepcopy(config)
    valid = flat_keys(config)
    for text in overrides:
        key, value = parse_override(text)
        if key not in valid:
            raise GrenError(f"override {text!r}: unknown key {key!r}; valid keys: {', '.join(valid)}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if isinstance(node[leaf], str) and value is not None:
            value = text.split("=", 1)[1].strip()  # string keys keep the text as typed (protocol 1.0_0.4)
        node[leaf] = _coerce(node[leaf], value, key, f"override {text!r}", schema)
    return out


def resolve_config(config_file: str | os.PathLike | None = None, overrides: Iterable[str] = (),
                   method: str | None = None, foreign: str = "error") -> dict:
    """default.yaml + the method's defaults <- ``config_file`` (path or bundled name) <- ``overrides``.

    Args:
        method: a registered method name (its sections only), or ``None`` (every method's sections).
        foreign: ``"error"`` (default): any key the config does not have is an error; ``"drop"``: keys
            of other methods' sections are left out (for a cross-validation over several methods).
    """
    if foreign not in ("error", "drop"):
        raise ValueError(f"foreign must be 'error' or 'drop', got {foreign!r}")
    config = default_config(method)
    if method is not None:
        config["method"] = method
    schema = config_schema(method)
    dropped = foreign_keys(config) if foreign == "drop" and method is not None else set()
    source = "config"
    if config_file is not None:
        path = _config_path(config_file)
        config = merge_config(config, _drop_foreign(load_yaml(path), dropped), str(path), schema=schema)
        source = str(path)
    overrides = list(overrides)
    if dropped:
        overrides = [o for o in overrides if o.split("=", 1)[0].strip() not in dropped]
    config = apply_overrides(config, overrides, schema)
    return validate_config(config, source if not overrides else "overrides")


def save_config(config: dict, path: str | os.PathLike) -> None:
    """Write ``config`` as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
