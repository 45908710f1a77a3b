"""The method contract (czsl_bench.method) and the worked plugin example of docs/methods.md.

The example in tests/plugin_example/ is a real installable package (its own pyproject.toml
with a ``czsl_bench.methods`` entry point). The test "installs" it the way pip would make it
visible — a dist-info folder with the entry points on sys.path, generated from that
pyproject.toml — and runs it end to end through the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from czsl_bench.cli import cli
from czsl_bench.config import resolve_config
from czsl_bench.method import Method, NoConfig, RunContext, TrainConfig, check_method_class
from czsl_bench.registry import METHODS
from fixtures.toy_world import registered_toy_dataset

PLUGIN_DIR = Path(__file__).parent / "plugin_example"


# -- the contract checker ----------------------------------------------------------------------
class _NoName(Method):
    def score(self, ctx, split):
        return torch.zeros(1, 1)


class _NoScore(Method):
    name = "no-score"


class _BadConfig(Method):
    name = "bad-config"
    Config = dict

    def score(self, ctx, split):
        return torch.zeros(1, 1)


@pytest.mark.parametrize("cls, message", [
    (object, "is not a czsl_bench.method.Method subclass"),
    (_NoName, "has no `name`"),
    (_NoScore, "does not implement score"),
    (_BadConfig, "Config must be a dataclass"),
])
def test_check_method_class_names_the_problem(cls, message):
    with pytest.raises(TypeError, match=message):
        check_method_class(cls)


def test_builtin_methods_satisfy_the_contract_for_every_dataset():
    for name in ("clip", "coop", "csp"):
        cls = METHODS.get(name)
        check_method_class(cls)
        for dataset in ("mit-states", "ut-zappos", "cgqa", "synthetic", "someone-elses"):
            cfg = cls.Config.defaults(dataset)
            assert dataclasses.is_dataclass(cfg) and isinstance(cfg, cls.Config)
        for variant, overrides in cls.ablations().items():  # every ablation resolves
            resolve_config(cls.Config, "synthetic", overrides)


# -- default hooks ----------------------------------------------------------------------------
@dataclasses.dataclass
class _Cfg(TrainConfig):
    @classmethod
    def defaults(cls, dataset):
        return cls(epochs=1)


class _Trainable(Method):
    name = "trainable"
    Config = _Cfg

    def prepare(self, ctx):
        self.head = torch.nn.Linear(2, 2)
        self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)

    def training_step(self, ctx, batch):
        return self.head(batch[0]).sum()

    def score(self, ctx, split):
        return torch.zeros(1, 1)


class _ZeroShot(Method):
    name = "zero-shot"
    Config = NoConfig

    def score(self, ctx, split):
        return torch.zeros(1, 1)


def _ctx(cfg=None):
    return RunContext(dataset_name="toy", dataset=None, backbone=None, config=cfg, seed=0)


def test_zero_shot_methods_do_not_train():
    method = _ZeroShot()
    assert not method.trains and method.fit(_ctx()) is None and method.parameters() == []


def test_default_parameters_and_state_dict_come_from_the_modules():
    method = _Trainable()
    method.prepare(_ctx())
    assert method.trains
    assert [p.shape for p in method.parameters()] == [torch.Size([2, 2]), torch.Size([2])]
    state = {k: v.clone() for k, v in method.state_dict().items()}
    assert len(state) == 4  # both modules' weights and biases
    with torch.no_grad():
        method.head.weight.add_(1)
    method.load_state_dict(state)
    assert torch.equal(method.head.weight, state["0.weight"])
    method.train_mode(True)
    assert method.head.training
    method.train_mode(False)
    assert not method.head.training


def test_a_trainable_method_without_a_trainer_says_how_to_run_it():
    method = _Trainable(_Cfg.defaults("toy"))
    method.prepare(_ctx())
    with pytest.raises(RuntimeError, match="use czsl_bench.api.run"):
        method.fit(_ctx(method.config))


# -- the worked example: an installable plugin ---------------------------------------------------
def _fake_install(site: Path) -> None:
    """What `pip install` leaves behind that entry-point discovery reads: a dist-info folder."""
    meta = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())
    project = meta["project"]
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    lines = []
    for group, entries in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines.extend(f"{name} = {target}" for name, target in entries.items())
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def installed_plugin(tmp_path):
    site = tmp_path / "site"
    _fake_install(site)
    sys.path[:0] = [str(site), str(PLUGIN_DIR)]
    METHODS.refresh()
    try:
        yield
    finally:
        sys.path.remove(str(site))
        sys.path.remove(str(PLUGIN_DIR))
        sys.modules.pop("czsl_example_plugin", None)
        METHODS.refresh()


def test_the_example_plugin_declares_its_entry_point():
    meta = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["czsl_bench.methods"] == {
        "linear-adapter": "czsl_example_plugin:LinearAdapter"}


def test_the_example_plugin_runs_end_to_end_through_the_cli(installed_plugin, tmp_path):
    assert "linear-adapter" in METHODS.names()
    check_method_class(METHODS.get("linear-adapter"))
    results = tmp_path / "results"
    with registered_toy_dataset(tmp_path / "toy"):
        result = CliRunner().invoke(cli, [
            "run", "linear-adapter", "--dataset", "toy", "--seed", "0,1", "--setting", "both",
            "--backbone", "czsl-tiny-vit", "--pretrained", "none", "--results-dir", str(results),
            "--cache-dir", str(tmp_path / "cache"), "--set", "epochs=2", "--set", "batch_size=12", "-q",
        ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for seed in (0, 1):
        for setting in ("closed", "open"):
            record = json.loads((results / "linear-adapter" / "toy" / setting / f"seed{seed}.json").read_text())
            assert record["method"] == "linear-adapter" and record["config"]["epochs"] == 2
            assert record["params"]["trainable"] == 128 * 128 + 128
            assert record["chosen_epoch"] in (1, 2)
    # the method wrote nothing itself: only records and the trainer's checkpoints exist
    written = {p.relative_to(results).parts[0] for p in results.rglob("*") if p.is_file()}
    assert written == {"linear-adapter", ".checkpoints"}
