"""YAML loading, `--set key=value` overrides and validation of `ExperimentConfig`.

Every error is a `ConfigError` naming the dotted key; an unknown key also names the
closest valid one.
"""

import dataclasses
import difflib
import os
import typing

import yaml

from tf_effitrain.config.schema import ConfigError, ExperimentConfig

__all__ = ["load_config", "config_from_dict", "parse_overrides", "save_config"]


def _one_line(error):
    """A YAML error's multi-line message as one line."""
    return " ".join(str(error).split())


def _closest(name, valid):
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" Did you mean `{match[0]}`?" if match else ""


def _type_name(tp):
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp, key):
    """Checks `value` against the annotation `tp`; returns it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin in (list, typing.List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"`{key}` must be a list of {_type_name(item_tp)}. Received: {key}={value!r}"
            )
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(
            f"`{key}` must be of type {_type_name(tp)}. Received: {key}={value!r} "
            f"({type(value).__name__})"
        )
    return float(value) if tp is float else value


def _check_bounds(value, meta, key):
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"`{key}` must be one of {list(choices)}. Received: {key}={value!r}."
            + _closest(str(value), [str(c) for c in choices])
        )
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"`{key}` must be >= {meta['min']}. Received: {key}={value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"`{key}` must be <= {meta['max']}. Received: {key}={value!r}")


def _build(cls, data, prefix):
    if not isinstance(data, dict):
        raise ConfigError(
            f"`{prefix.rstrip('.') or 'config'}` must be a mapping. Received: "
            f"{type(data).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(
                f"Unknown config key `{key}`." + _closest(name, list(fields)).replace(
                    "`", f"`{prefix}", 1
                )
                + f" Valid keys: {', '.join(prefix + f for f in fields)}"
            )
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{key}.")
        else:
            kwargs[name] = _coerce(value, tp, key)
            _check_bounds(kwargs[name], fields[name].metadata, key)
    return cls(**kwargs)


def config_from_dict(data):
    """Builds and validates an `ExperimentConfig` from a nested dict."""
    return _build(ExperimentConfig, data or {}, "").validate()


def parse_overrides(overrides):
    """Turns `["a.b=1", ...]` into a nested dict; values are parsed as YAML scalars."""
    nested = {}
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(
                f"An override must look like `section.key=value`. Received: {item!r}"
            )
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(
                f"Override `{item}`: the value is not valid YAML ({_one_line(e)}). "
                "Quote it if it is a string (`key='[1'`), or close the list (`[1, 2]`)."
            ) from None
        node = nested
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override `{dotted}` conflicts with another override.")
        node[parts[-1]] = value
    return nested


def _merge(base, extra):
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path=None, overrides=None):
    """Loads a YAML config (or the defaults when `path` is None) plus `--set` overrides.

    Args:
        path: str or None. A YAML file.
        overrides: list of str. `section.key=value` items, applied after the file.

    Returns:
        A validated `ExperimentConfig`.
    """
    data = {}
    if path is not None:
        if not os.path.isfile(path):
            what = "is a directory, not a file" if os.path.isdir(path) else "not found"
            raise ConfigError(f"Config file {what}: {path!r}")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(
                    f"Config file {path!r} is not valid YAML: {_one_line(e)}") from None
            except UnicodeDecodeError as e:
                raise ConfigError(
                    f"Config file {path!r} is not UTF-8 text ({e.reason} at byte "
                    f"{e.start}). Save it as UTF-8.") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"Config file {path!r} must hold a mapping of sections (runtime:, data:, "
                f"model:, ...). Received: {type(data).__name__}")
    return config_from_dict(_merge(data, parse_overrides(overrides)))


def save_config(config, path):
    """Writes the resolved config as YAML (loadable by `load_config`)."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
