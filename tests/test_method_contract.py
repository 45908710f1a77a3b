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

from czsl_bench import api
from czsl_bench.cli import cli
from czsl_bench.config import resolve, resolve_config
from czsl_bench.datasets.plugin import RECIPES, DatasetPlugin
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


class _SomeoneElses(DatasetPlugin):
    """A third-party dataset: it declares a recipe family, methods never see its name."""

    name = "someone-elses"
    recipe = "ut-zappos"


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_satisfies_the_contract_for_every_recipe(name):
    cls = METHODS.get(name)
    check_method_class(cls)
    for recipe in RECIPES:
        cfg = cls.Config.defaults(recipe)
        assert dataclasses.is_dataclass(cfg) and isinstance(cfg, cls.Config)
        assert resolve(cls, recipe).config == cfg  # the one resolve pipeline starts from the recipe
    # a third-party dataset's runs take the defaults of the recipe its plugin declares
    assert api.resolve_method_config(cls, _SomeoneElses()).config == cls.Config.defaults("ut-zappos")
    for variant, overrides in cls.ablations().items():  # every ablation resolves, by name too
        resolve_config(cls.Config, "synthetic", overrides)
        resolved = resolve(cls, "synthetic", ablation=variant)
        assert all(resolved.sources[k].startswith(("ablation", "derived")) for k in resolved.changed)
    assert getattr(cls, "track", "inductive") in ("inductive", "transductive")


def test_the_contract_test_covers_the_built_in_methods():
    assert {"clip", "coop", "csp", "troika", "cluspro", "cluspro-base", "vpcmjl", "cams"} <= set(METHODS.names())


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
    assert not method.trains and method.parameters() == []
    assert not hasattr(method, "fit")  # the harness trains (Trainer(...).fit(method, ctx)), not the method


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


class _ToyZeroShot(Method):
    name = "toy-zero-shot"
    Config = NoConfig

    def score(self, ctx, split):
        return torch.zeros(len(split), len(split.pairs))


class _ToyTrainable(_ToyZeroShot):
    name = "toy-trainable"
    Config = _Cfg

    def prepare(self, ctx):
        self.head = torch.nn.Linear(2, 1)

    def modules(self):
        return [self.head]

    def train_dataset(self, ctx):
        return torch.utils.data.TensorDataset(torch.ones(4, 2))

    def training_step(self, ctx, batch):
        return self.head(batch[0]).pow(2).mean()


@pytest.fixture
def toy_methods():
    METHODS.register()(_ToyZeroShot)
    METHODS.register()(_ToyTrainable)
    yield
    METHODS.unregister("toy-zero-shot")
    METHODS.unregister("toy-trainable")


def test_the_harness_trains_exactly_the_methods_that_train(toy_methods, tmp_path, monkeypatch):
    """The harness calls the shared Trainer with the run's training fingerprint when
    ``method.trains``, and never for a zero-shot method."""
    from czsl_bench.training import Trainer

    calls = []
    real_fit = Trainer.fit

    def spy(self, method, ctx):
        calls.append((method.name, self.fingerprint, self.checkpoint_dir))
        return real_fit(self, method, ctx)

    monkeypatch.setattr(Trainer, "fit", spy)
    opts = dict(backbone="czsl-tiny-vit", pretrained="none", results_dir=tmp_path / "r", cache_dir=tmp_path / "c")
    with registered_toy_dataset(tmp_path / "toy"):
        zero = api.run("toy-zero-shot", "toy", **opts)
        assert calls == [] and zero.chosen_epoch is None and zero.environment["training"] is None
        trained = api.run("toy-trainable", "toy", **opts)
    assert [name for name, _, _ in calls] == ["toy-trainable"]
    _, fingerprint, checkpoint_dir = calls[0]
    assert fingerprint == api.training_fingerprint(trained.run_identity)
    assert checkpoint_dir == tmp_path / "r" / ".checkpoints" / "toy-trainable" / "toy" / fingerprint
    assert trained.chosen_epoch == 1 and trained.environment["training"]["epochs"] == 1


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
            # --set changed the recipe's epochs and batch size: a custom-<cfg8> configuration folder
            [path] = (results / "linear-adapter" / "toy" / "czsl-tiny-vit-random" / setting).glob(
                f"custom-*/seed{seed}.json")
            record = json.loads(path.read_text())
            assert record["overrides"] == {"epochs": 2, "batch_size": 12}
            assert record["method"] == "linear-adapter" and record["config"]["epochs"] == 2
            assert record["params"]["trainable"] == 128 * 128 + 128
            assert record["chosen_epoch"] in (1, 2)
    # the method wrote nothing itself: only records and the trainer's checkpoints exist
    written = {p.relative_to(results).parts[0] for p in results.rglob("*") if p.is_file()}
    assert written == {"linear-adapter", ".checkpoints"}
