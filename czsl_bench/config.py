"""Typed dataclass configs: ``--set`` parsing, config files and the resolution order.

A method's config is a dataclass (``Method.Config``) with a ``defaults(dataset)`` classmethod.
The resolved config of a run is built in this order, later wins::

    ConfigCls.defaults(dataset)  <  config file (YAML, JSON or TOML)  <  --set key=value

Every value is coerced to the type annotated on the dataclass field, so ``--set lr=1e-3`` gives a
float and ``--set use_amp=no`` a bool; an unknown key or a value of the wrong type is one clear
line naming the key, the expected type and how to fix it. Nested dataclasses are addressed with
dots (``--set optim.lr=1e-3``).

Values are also checked, so a bad one fails when the config is resolved rather than deep inside
a run: every float must be finite (``nan``/``inf`` parse as floats but would only surface after
training), and a field declared with :func:`at_least` keeps its minimum (``score_block: int =
at_least(1, 50_000)``; 0 would end in ``torch.cat(): expected a non-empty list``).

Everything here is pure Python (no torch), so the CLI can resolve configs cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import json
import math
import types
import typing
from pathlib import Path, PurePath
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

C = TypeVar("C")

_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}
_NONE = {"none", "null", "~"}


class ConfigError(ValueError):
    """A config key is unknown or a value does not fit the field's type."""


# -- type introspection ------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (strings under ``from __future__ import annotations``)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass; configs must be dataclasses")
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:  # an annotation that does not resolve is a bug in the config class
        raise TypeError(f"cannot resolve the field types of {cls.__qualname__}: {exc}") from exc
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def field_aliases(cls: type) -> dict[str, str]:
    """``{alias: field}`` from ``field(metadata={"alias": "mu"})``: the name a paper or a table uses
    for a field (ClusPro's ``mu`` is ``ema_momentum``). Either name works in ``--set``, config
    files and ablations; records store the field name."""
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.metadata["alias"]: f.name for f in dataclasses.fields(cls) if "alias" in f.metadata}


def _canonical_key(cls: type, key: str) -> str:
    return field_aliases(cls).get(key, key)


def _known_keys(cls: type, types_: dict[str, Any]) -> list[str]:
    return sorted(set(types_) | set(field_aliases(cls)))


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any value"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_union(origin: Any) -> bool:
    return origin is Union or origin is types.UnionType


def _unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    close = [k for k in known if k.lower() == key.lower()] or difflib.get_close_matches(key, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} for {where}.{hint} Known keys: {', '.join(known)}")


# -- value checks ------------------------------------------------------------------------------


def at_least(minimum: int, default: int) -> Any:
    """A dataclass field with ``default`` that must stay ``>= minimum`` (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"min": minimum})


def check_value(f: dataclasses.Field, value: Any, key: str) -> None:
    """Raise :class:`ConfigError` when ``value`` of field ``f`` is not finite or below its minimum."""
    for item in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{key}: expected a finite float, got {value!r}")
    minimum = f.metadata.get("min")
    if minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")


def check_config(cfg: Any, where: str | None = None) -> None:
    """:func:`check_value` on every field of a config instance, nested configs included."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f.name if where is None else f"{where}.{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_config(value, key)
        else:
            check_value(f, value, key)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


# -- value coercion ----------------------------------------------------------------------------


def coerce(value: Any, tp: Any, key: str = "value") -> Any:
    """Convert ``value`` (a string from the command line, or a parsed YAML/JSON value) to ``tp``.

    Raises :class:`ConfigError` naming ``key`` and the expected type when it does not fit.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return _parse_literal(value) if isinstance(value, str) else value

    if _is_union(origin):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if len(non_none) < len(args):
                return None
        errors = []
        for option in non_none:
            try:
                return coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:  # Optional[X]: X's own message says more ("a finite float")
            raise errors[0]
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")

    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(
            f"{key}: expected one of {', '.join(repr(a) for a in args)}, got {value!r}"
        )

    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if isinstance(value, str):
            value = _parse_literal(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where=key)

    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        items = _as_sequence(value, key)
        container = origin or tp
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items ({_type_name(tp)}), got {value!r}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
        item_tp = args[0] if args else Any
        converted = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(items)]
        return container(converted)

    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = _parse_literal(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (JSON object), got {value!r}")
        key_tp, val_tp = args if args else (Any, Any)
        return {coerce(k, key_tp, key): coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected a bool (true/false, yes/no, 1/0), got {value!r}")

    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text)
            except ValueError:
                pass
            try:  # "1e4" is a common way to write an integer step count
                as_float = float(text)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
        raise ConfigError(f"{key}: expected an int, got {value!r}")

    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        if not math.isfinite(number):  # "nan", "inf", "1e999", YAML .nan
            raise ConfigError(f"{key}: expected a finite float, got {value!r}")
        return number

    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `tag: 2024` as an int; the field wants the text
        raise ConfigError(f"{key}: expected a string, got {value!r}")

    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member or value == member.value or value == member.name:
                return member
        raise ConfigError(
            f"{key}: expected one of {', '.join(str(m.value) for m in tp)}, got {value!r}"
        )

    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}")

    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _parse_literal(text: str) -> Any:
    """JSON if it parses (numbers, lists, objects, true/false/null), else the text itself."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def _as_sequence(value: Any, key: str) -> list[Any]:
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            parsed = _parse_literal(text)
            if not isinstance(parsed, list):
                raise ConfigError(f"{key}: {value!r} is not a valid JSON list")
            return parsed
        return [part.strip() for part in text.split(",")] if text else []
    raise ConfigError(f"{key}: expected a list (comma-separated or JSON), got {value!r}")


# -- building and overriding -------------------------------------------------------------------


def _build(cls: type[C], values: dict[str, Any], where: str) -> C:
    """A fresh ``cls`` from a (possibly partial) mapping; unknown keys are an error."""
    base = cls.defaults() if _has_argless_defaults(cls) else None
    if base is None:
        try:
            base = cls()
        except TypeError:
            base = None
    if base is not None:
        return apply_values(base, values, where=where)
    types_ = _field_types(cls)
    values = {_canonical_key(cls, k): v for k, v in values.items()}
    unknown = [k for k in values if k not in types_]
    if unknown:
        raise _unknown_key(unknown[0], _known_keys(cls, types_), where)
    return cls(**{k: coerce(v, types_[k], f"{where}.{k}") for k, v in values.items()})


def _call_defaults(cls: type[C], dataset: str | None) -> C:
    """``cls.defaults(dataset)``, ``cls.defaults()`` when it takes no argument, else ``cls()``."""
    if getattr(cls, "defaults", None) is None:
        return cls()
    if _has_argless_defaults(cls) and _takes_no_argument(cls.defaults):
        return cls.defaults()
    return cls.defaults(dataset)


def _takes_no_argument(fn: Any) -> bool:
    try:
        return not inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _has_argless_defaults(cls: type) -> bool:
    # Nested configs may also expose defaults(); only call it when it takes no dataset argument.
    fn = getattr(cls, "defaults", None)
    if fn is None:
        return False
    try:
        return not any(
            p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            for p in inspect.signature(fn).parameters.values()
        )
    except (TypeError, ValueError):
        return False


def apply_values(cfg: C, values: dict[str, Any], where: str | None = None) -> C:
    """A copy of ``cfg`` with ``values`` (a nested mapping) applied and coerced to the field types.

    A nested dataclass field takes a nested mapping and keeps the fields it does not mention.
    """
    cls = type(cfg)
    where = where or cls.__qualname__
    types_ = _field_types(cls)
    fields_ = _fields(cls)
    changes: dict[str, Any] = {}
    for key, value in values.items():
        key = _canonical_key(cls, key)
        if key not in types_:
            raise _unknown_key(key, _known_keys(cls, types_), where)
        tp = types_[key]
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = apply_values(current, value, where=f"{where}.{key}")
        else:
            label = key if where == cls.__qualname__ else f"{where}.{key}"
            changes[key] = coerce(value, tp, label)
            check_value(fields_[key], changes[key], label)
    try:
        return dataclasses.replace(cfg, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # __post_init__ validation of the config class
        raise ConfigError(f"invalid {where}: {exc}") from exc


def parse_overrides(items: list[str] | tuple[str, ...], config_cls: type | None = None) -> dict[str, Any]:
    """Parse ``["a.b=1", "lr=1e-3"]`` into a nested mapping ``{"a": {"b": 1}, "lr": 0.001}``.

    With ``config_cls`` every key is checked against the dataclass (unknown key: error with close
    matches) and every value coerced to the field's type; without it the values stay strings.
    """
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value; write e.g. --set lr=1e-3")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key; write e.g. --set optim.lr=1e-3")
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            existing = node.setdefault(part, {})
            if not isinstance(existing, dict):
                raise ConfigError(f"override {item!r} conflicts with --set {part}=...")
            node = existing
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"override {item!r} conflicts with --set {key}.<field>=...")
        node[parts[-1]] = raw
    if config_cls is not None:
        return _coerce_nested(config_cls, nested, config_cls.__qualname__, prefix="")
    return nested


def _coerce_nested(cls: type, values: dict[str, Any], where: str, prefix: str) -> dict[str, Any]:
    types_ = _field_types(cls)
    fields_ = _fields(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = _canonical_key(cls, key)
        dotted = f"{prefix}{key}"
        if key not in types_:
            raise _unknown_key(dotted, [f"{prefix}{k}" for k in _known_keys(cls, types_)], where)
        tp = types_[key]
        if isinstance(value, dict) and dataclasses.is_dataclass(tp):
            out[key] = _coerce_nested(tp, value, where, prefix=f"{dotted}.")
        elif isinstance(value, dict):
            raise ConfigError(f"{dotted} is a {_type_name(tp)}, not a group; use --set {dotted}=VALUE")
        else:
            out[key] = coerce(value, tp, dotted)
            check_value(fields_[key], out[key], dotted)
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``), JSON or TOML config file into a mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(
                    f"config file {path} is YAML but PyYAML is not installed; "
                    "`pip install pyyaml` or use a .json/.toml file"
                ) from None
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file {path}: unknown format {suffix!r}; use .yaml, .json or .toml")
    except ConfigError:
        raise
    except Exception as exc:  # parser errors: report the file, not the parser's traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config file {path} does not parse: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def resolve_config(
    config_cls: type[C],
    dataset: str | None,
    overrides: list[str] | tuple[str, ...] | dict[str, Any] = (),
    config_file: str | Path | None = None,
) -> C:
    """The fully resolved config: ``--set`` overrides > config file > ``config_cls.defaults(dataset)``.

    ``overrides`` is a list of ``key=value`` strings (as given to ``--set``) or an already nested
    mapping. Without a ``defaults`` classmethod the dataclass' own field defaults are the base.
    """
    cfg = _call_defaults(config_cls, dataset)
    if not isinstance(cfg, config_cls):
        raise TypeError(f"{config_cls.__qualname__}.defaults({dataset!r}) returned {type(cfg).__name__}")
    if config_file is not None:
        file_values = load_config_file(config_file)
        try:
            cfg = apply_values(cfg, file_values)
        except ConfigError as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from None
    if overrides:
        values = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides), config_cls)
        cfg = apply_values(cfg, values)
    check_config(cfg)  # also what defaults() and a config file set
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready nested dict of a config (paths and enums as strings, tuples as lists)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"config_to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return {f.name: _jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    return value


def config_from_dict(config_cls: type[C], values: dict[str, Any]) -> C:
    """Rebuild a config from :func:`config_to_dict` output (e.g. the ``config`` of a run record)."""
    return _build(config_cls, values, where=config_cls.__qualname__)


# -- the one resolution pipeline -----------------------------------------------------------------

SOURCE_CLASS = "class default"


@dataclass(frozen=True)
class Resolved:
    """A resolved config and where each value came from.

    ``sources`` maps every dotted field to ``"class default"``, ``"recipe NAME"``, ``"config file
    PATH"``, ``"ablation NAME"``, ``"--set"`` or ``"derived from ..."`` (a value a config computes
    from another, e.g. ClusPro's variant). ``changed`` holds the values that differ from the
    recipe defaults, dotted: what a table names when it tells two configurations apart.
    """

    config: Any
    sources: dict[str, str]
    changed: dict[str, Any]


def resolve(
    target: type,
    recipe: str | None,
    config_file: str | Path | None = None,
    ablation: str | None = None,
    overrides: list[str] | tuple[str, ...] | dict[str, Any] | None = (),
) -> Resolved:
    """``target.defaults(recipe)`` < config file < ablation < ``--set``, with provenance.

    ``target`` is a method class (its ``Config`` and ``ablations()`` are used) or a config
    dataclass. ``overrides`` are ``key=value`` strings (parsed once here) or a nested mapping;
    aliases (``mu``) are accepted everywhere. Errors are one-line :class:`ConfigError`.
    """
    config_cls = getattr(target, "Config", target)
    stages: list[tuple[str, Any, dict[str, Any] | None]] = []
    try:
        base = config_cls() if not _has_required_fields(config_cls) else None
    except (TypeError, ValueError):
        base = None
    cfg = _call_defaults(config_cls, recipe)
    if not isinstance(cfg, config_cls):
        raise TypeError(f"{config_cls.__qualname__}.defaults({recipe!r}) returned {type(cfg).__name__}")
    recipe_cfg = cfg
    if config_file is not None:
        file_values = load_config_file(config_file)
        try:
            cfg = apply_values(cfg, file_values)
        except ConfigError as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from None
        stages.append((f"config file {config_file}", cfg, _normalise(config_cls, file_values)))
    if ablation is not None:
        variants = target.ablations() if hasattr(target, "ablations") else {}
        if ablation not in variants:
            known = ", ".join(sorted(variants)) or "none"
            name = getattr(target, "name", config_cls.__qualname__)
            raise ConfigError(f"method {name!r} has no ablation {ablation!r}; known: {known}")
        cfg = apply_values(cfg, variants[ablation])
        stages.append((f"ablation {ablation}", cfg, _normalise(config_cls, variants[ablation])))
    if overrides:
        values = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides), config_cls)
        cfg = apply_values(cfg, values)
        stages.append(("--set", cfg, _normalise(config_cls, values)))

    final = _flat(config_to_dict(cfg))
    recipe_values = _flat(config_to_dict(recipe_cfg))
    class_values = _flat(config_to_dict(base)) if base is not None else {}
    sources = {}
    for key in final:
        if key in class_values and _same(class_values[key], recipe_values.get(key)):
            sources[key] = SOURCE_CLASS
        else:
            sources[key] = f"recipe {recipe}"
    previous = recipe_values
    for label, stage_cfg, mentioned in stages:
        values = _flat(config_to_dict(stage_cfg))
        for key, value in values.items():
            if key in (mentioned or {}):
                sources[key] = label
            elif not _same(value, previous.get(key)):
                sources[key] = f"derived from {label}"
        previous = values
    changed = {k: v for k, v in final.items() if not _same(v, recipe_values.get(k))}
    return Resolved(cfg, sources, changed)


def _has_required_fields(cls: type) -> bool:
    return any(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(cls) if f.init)


def _normalise(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Dotted canonical field names a stage mentioned (aliases resolved)."""
    out: dict[str, Any] = {}
    types_ = _field_types(cls) if dataclasses.is_dataclass(cls) else {}
    for key, value in values.items():
        key = _canonical_key(cls, key)
        tp = types_.get(key)
        if isinstance(value, dict) and dataclasses.is_dataclass(tp):
            out.update({f"{key}.{k}": v for k, v in _normalise(tp, value).items()})
        else:
            out[key] = value
    return out


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
