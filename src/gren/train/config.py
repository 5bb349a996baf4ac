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
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import yaml

from gren.core.atomic import write_text_atomic
from gren.core.errors import GrenError


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


# Keys that accept null (besides those whose default is null).
NULLABLE = ("data.annotated_fraction", "train.max_steps_per_epoch", "train.keep_epochs")


def _coerce(default, value, key: str, source: str):
    if value is None or (value == "None" and not isinstance(default, str)):
        if default is None or key in NULLABLE:
            return None
        raise GrenError(f"{source}: {key} cannot be null (default {default!r})")
    if isinstance(default, dict):
        raise GrenError(f"{source}: {key} is a section ({', '.join(default)}), not a value")
    if isinstance(value, dict):
        raise GrenError(f"{source}: {key} takes a value, not a mapping")
    if isinstance(default, bool) and not isinstance(value, bool):
        raise GrenError(f"{source}: {key} must be true or false, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-2" as a string
            value = float(value)
        except ValueError:
            raise GrenError(f"{source}: {key} must be a number, got {value!r}") from None
    if isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def merge_config(base: dict, update: dict, source: str, prefix: str = "") -> dict:
    """``base`` updated recursively by ``update``; keys absent from ``base`` are an error naming ``source``."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in out:
            valid = ", ".join(flat_keys(base, prefix)) if prefix else ", ".join(base)
            raise GrenError(f"{source}: unknown config key {dotted!r}; valid keys here: {valid}")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge_config(out[key], value, source, dotted + ".")
        else:
            out[key] = _coerce(out[key], value, dotted, source)
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


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key=value`` strings to a copy of ``config``; unknown keys list the valid ones."""
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
        node[leaf] = _coerce(node[leaf], value, key, f"override {text!r}")
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
    dropped = foreign_keys(config) if foreign == "drop" and method is not None else set()
    if config_file is not None:
        path = _config_path(config_file)
        config = merge_config(config, _drop_foreign(load_yaml(path), dropped), str(path))
    overrides = list(overrides)
    if dropped:
        overrides = [o for o in overrides if o.split("=", 1)[0].strip() not in dropped]
    return apply_overrides(config, overrides)


def save_config(config: dict, path: str | os.PathLike) -> None:
    """Write ``config`` as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))
