"""Typed configs: --set parsing and coercion, config files, resolution order, round trips."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from czsl_bench.config import (
    ConfigError,
    apply_values,
    coerce,
    config_from_dict,
    config_to_dict,
    load_config_file,
    parse_overrides,
    resolve_config,
)


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    name: Literal["adam", "sgd"] = "adam"


@dataclass
class ToyConfig:
    epochs: int = 10
    lr: float = 5e-5
    use_amp: bool = True
    context: str = "a photo of"
    threshold: Optional[float] = None
    k: int | None = 5
    layers: list[int] = field(default_factory=lambda: [1, 2])
    cache: Path = Path("cache")
    extra: dict[str, float] = field(default_factory=dict)
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")

    @classmethod
    def defaults(cls, dataset: str) -> "ToyConfig":
        # per-dataset defaults, as the methods' configs do it
        return cls(epochs=3 if dataset == "synthetic" else 20, lr=1e-3 if dataset == "synthetic" else 5e-5)


def test_parse_overrides_coerces_to_field_types():
    values = parse_overrides(
        ["epochs=7", "lr=1e-3", "use_amp=no", "threshold=0.25", "k=none", "layers=3,4,5",
         "cache=/tmp/c", "optim.lr=2e-5", "optim.betas=[0.8, 0.9]", "optim.name=sgd", 'extra={"a": 1}'],
        ToyConfig,
    )
    assert values == {
        "epochs": 7, "lr": 1e-3, "use_amp": False, "threshold": 0.25, "k": None, "layers": [3, 4, 5],
        "cache": Path("/tmp/c"), "extra": {"a": 1.0},
        "optim": {"lr": 2e-5, "betas": (0.8, 0.9), "name": "sgd"},
    }
    assert isinstance(values["lr"], float) and isinstance(values["epochs"], int)


def test_parse_overrides_without_class_keeps_strings_nested():
    assert parse_overrides(["a.b=1", "lr=1e-3"]) == {"a": {"b": "1"}, "lr": "1e-3"}


@pytest.mark.parametrize(
    "item, message",
    [
        ("lrr=1", "unknown config key 'lrr' for ToyConfig. Did you mean lr?"),
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("epochs=ten", "epochs: expected an int, got 'ten'"),
        ("epochs=1.5", "epochs: expected an int"),
        ("lr=fast", "lr: expected a float, got 'fast'"),
        ("use_amp=maybe", "use_amp: expected a bool"),
        ("optim.name=rmsprop", "optim.name: expected one of 'adam', 'sgd', got 'rmsprop'"),
        ("optim.betas=1,2,3", "optim.betas: expected 2 items"),
        ("lr", "is not key=value"),
        ("=3", "has an empty key"),
        ("lr.x=3", "lr is a float, not a group"),
    ],
)
def test_parse_overrides_errors_are_one_clear_line(item, message):
    with pytest.raises(ConfigError) as info:
        parse_overrides([item], ToyConfig)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_int_accepts_scientific_integers_and_bool_forms():
    assert coerce("1e4", int) == 10000
    for text, expected in [("true", True), ("Yes", True), ("1", True), ("off", False), ("0", False)]:
        assert coerce(text, bool) is expected


def test_resolution_order_set_beats_file_beats_defaults(tmp_path):
    cfg = resolve_config(ToyConfig, "synthetic")
    assert (cfg.epochs, cfg.lr) == (3, 1e-3)  # defaults(dataset)
    assert resolve_config(ToyConfig, "mit-states").epochs == 20

    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"epochs": 8, "use_amp": False, "optim": {"lr": 0.5}}))
    cfg = resolve_config(ToyConfig, "synthetic", ["epochs=9"], config_file)
    assert cfg.epochs == 9  # --set wins over the file
    assert cfg.use_amp is False  # from the file
    assert cfg.lr == 1e-3  # from defaults(dataset)
    assert cfg.optim.lr == 0.5 and cfg.optim.betas == (0.9, 0.999)  # nested: partial update


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "epochs: 4\noptim:\n  name: sgd\n"),
    (".toml", "epochs = 4\n[optim]\nname = \"sgd\"\n"),
    (".json", '{"epochs": 4, "optim": {"name": "sgd"}}'),
])
def test_config_file_formats(tmp_path, suffix, text):
    path = tmp_path / f"cfg{suffix}"
    path.write_text(text)
    cfg = resolve_config(ToyConfig, "synthetic", (), path)
    assert cfg.epochs == 4 and cfg.optim.name == "sgd"


def test_config_file_errors_name_the_file(tmp_path):
    bad_key = tmp_path / "bad.json"
    bad_key.write_text('{"epoch": 3}')
    with pytest.raises(ConfigError, match=r"bad\.json: unknown config key 'epoch'.*Did you mean epochs"):
        resolve_config(ToyConfig, "synthetic", (), bad_key)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match=r"broken\.json does not parse"):
        load_config_file(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown format"):
        (tmp_path / "x.ini").write_text("")
        load_config_file(tmp_path / "x.ini")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config_file(listy)


def test_post_init_validation_becomes_config_error():
    with pytest.raises(ConfigError, match="epochs must be >= 0"):
        resolve_config(ToyConfig, "synthetic", ["epochs=-1"])


def test_config_to_dict_is_json_ready_and_round_trips():
    cfg = resolve_config(ToyConfig, "synthetic", ["cache=/x/y", "optim.betas=0.1,0.2", "threshold=0.3"])
    data = config_to_dict(cfg)
    text = json.dumps(data)  # plain JSON: paths as strings, tuples as lists
    assert data["cache"] == "/x/y" and data["optim"]["betas"] == [0.1, 0.2]
    assert config_from_dict(ToyConfig, json.loads(text)) == cfg


def test_apply_values_keeps_unmentioned_nested_fields():
    cfg = apply_values(ToyConfig(), {"optim": {"name": "sgd"}})
    assert cfg.optim == Optim(name="sgd")


def test_config_without_defaults_classmethod_uses_field_defaults():
    @dataclass
    class Plain:
        a: int = 1

    assert resolve_config(Plain, "anything", ["a=2"]) == Plain(a=2)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_int_round_trips_through_text(value):
    assert parse_overrides([f"epochs={value}"], ToyConfig)["epochs"] == value


@settings(max_examples=60, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_round_trips_through_text(value):
    parsed = parse_overrides([f"lr={value!r}"], ToyConfig)["lr"]
    assert parsed == value and math.copysign(1, parsed) == math.copysign(1, value)
