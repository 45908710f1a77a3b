"""czsl_bench.run / `czsl-bench run`: records, settings, seeds, skip-existing, resume, errors.

Runs end to end on the 3 x 3 toy world with the real tiny open_clip architecture (random
weights), so every step of the harness executes: dataset plugin, backbone, feature cache,
method, Trainer with model selection, evaluator (closed and open world), atomic records.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import czsl_bench
from czsl_bench import api
from czsl_bench.cli import cli
from czsl_bench.identity import RANDOM_INIT
from czsl_bench.method import Method, NoConfig
from czsl_bench.records import find_existing, read_record, record_path
from czsl_bench.registry import METHODS
from czsl_bench.seeding import set_deterministic
from fixtures.toy_world import registered_toy_dataset

TINY = dict(backbone="czsl-tiny-vit", pretrained="none")
TINY_DIR = "czsl-tiny-vit-random"  # <arch>-<tag> folder of the tiny backbone with random weights
CSP_FAST = ["epochs=2", "batch_size=12", "lr=0.05"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    with registered_toy_dataset(tmp_path_factory.mktemp("toy")) as root:
        yield root


@pytest.fixture
def opts(tmp_path):
    return dict(results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", **TINY)


def test_clip_run_returns_and_writes_one_complete_record(toy, opts, tmp_path):
    record = czsl_bench.run("clip", "toy", seed=0, **opts)
    path = opts["results_dir"] / "clip" / "toy" / TINY_DIR / "closed" / "seed0.json"
    assert record.source_path == path == record_path(opts["results_dir"], record.run_identity)
    assert read_record(path).to_dict() == record.to_dict()
    ident = record.run_identity
    assert record.fingerprint == ident.fingerprint and record.overrides == {} and record.variant is None
    assert (ident.method, ident.setting, ident.seed, ident.track) == ("clip", "closed", 0, "inductive")
    assert ident.dataset["name"] == "toy" and ident.dataset["version"]  # the content hash of the copy
    # random weights are named by their init in the identity; the record keeps their actual hash
    assert ident.backbone == {"arch": "czsl-tiny-vit", "pretrained": None, "weights_hash": RANDOM_INIT}
    assert len(record.backbone["weights_hash"]) == 64
    assert ident.config == record.config and ident.protocol == record.protocol
    assert record.protocol and record.chosen_epoch is None
    assert set(record.metrics) == {"val", "test"} and 0 <= record.metrics["test"]["auc"] <= 1
    assert record.n_images == {"val": 9, "test": 12}
    assert record.params["trainable"] == 0 and record.params["total"] > 1_000_000
    assert record.config["template"] == "a photo of {attr} {obj}"
    assert record.backbone["arch"] == "czsl-tiny-vit" and record.backbone["pretrained"] is None
    assert {"load_dataset", "load_backbone", "prepare", "fit", "evaluate_closed", "total"} <= set(record.timings)
    assert record.environment["seeding"] == {"seed": 0, "deterministic": False}
    assert "torch" in record.environment["packages"]


def test_csp_both_settings_train_once_and_select_the_epoch(toy, opts):
    records = czsl_bench.run("csp", "toy", seed=1, setting="both", overrides=CSP_FAST, **opts)
    closed, open_ = records
    assert (closed.setting, open_.setting) == ("closed", "open")
    fit = closed.environment["training"]
    assert fit == open_.environment["training"]  # one training for both records
    assert fit["select_metric"] == "auc" and len(fit["history"]) == 2
    best = max(range(2), key=lambda i: fit["history"][i]["val"]["auc"])
    assert closed.chosen_epoch == fit["history"][best]["epoch"] == fit["chosen_epoch"]
    assert closed.config["epochs"] == 2 and closed.config["lr"] == 0.05  # --set wins over defaults
    assert closed.params["trainable"] == 6 * 128
    assert closed.open_threshold is None and open_.open_threshold is not None
    assert open_.provenance == {"feasibility": "backbone-token-embeddings"}
    # the settings are two identities of one training: same group but for setting and feasibility
    assert closed.run_identity.feasibility is None
    assert open_.run_identity.feasibility == "backbone-token-embeddings"
    assert closed.fingerprint != open_.fingerprint
    assert closed.overrides == open_.overrides == {"epochs": 2, "batch_size": 12, "lr": 0.05}
    assert closed.source_path.parent.name == f"custom-{closed.run_identity.config_fingerprint}"
    # the closed val metrics of the chosen epoch are what the record reports for val
    assert closed.metrics["val"]["auc"] == pytest.approx(fit["history"][best]["val"]["auc"])


def test_same_seed_same_numbers(toy, opts):
    a = czsl_bench.run("csp", "toy", seed=3, overrides=CSP_FAST, write=False, **opts)
    b = czsl_bench.run("csp", "toy", seed=3, overrides=CSP_FAST, write=False, **opts)
    assert a.metrics == b.metrics and a.chosen_epoch == b.chosen_epoch
    try:
        c = czsl_bench.run("csp", "toy", seed=3, overrides=CSP_FAST, write=False, deterministic=True, **opts)
    finally:
        set_deterministic(False)
    assert c.environment["seeding"] == {"seed": 3, "deterministic": True}
    assert c.metrics == a.metrics  # deterministic kernels change nothing on CPU


def test_grid_and_skip_existing(toy, opts, monkeypatch):
    first = czsl_bench.run("clip", "toy", seed="0-1", **opts)
    assert [r.seed for r in first] == [0, 1]

    def boom(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    # the skip is decided by fingerprint, once dataset and backbone are loaded: nothing after it runs
    monkeypatch.setattr(METHODS.get("clip"), "prepare", boom)
    again = czsl_bench.run("clip", "toy", seed=[0, 1], skip_existing=True, **opts)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in first]
    assert [r.source_path for r in again] == [r.source_path for r in first]
    outcome = api.execute(api.RunSpec("clip", "toy", 0, ("closed",)),
                          api.RunOptions(skip_existing=True, **opts))
    assert outcome.skipped and outcome.skipped_paths == [str(first[0].source_path)]
    with pytest.raises(api.RunError, match="a finished run was run again"):
        czsl_bench.run("clip", "toy", seed=0, **opts)
    # another configuration of the same (method, dataset, seed) is not finished
    with pytest.raises(api.RunError, match="a finished run was run again"):
        czsl_bench.run("clip", "toy", seed=0, skip_existing=True, overrides=["template=a drawing of {attr} {obj}"],
                       **opts)


def test_resume_continues_from_the_checkpoint(toy, opts):
    full = czsl_bench.run("csp", "toy", seed=2, overrides=CSP_FAST, **opts)
    again = czsl_bench.run("csp", "toy", seed=2, overrides=CSP_FAST, resume=True, **opts)
    assert again.environment["training"]["resumed_from"] == 2  # finished: nothing retrained
    assert again.metrics == full.metrics and again.chosen_epoch == full.chosen_epoch


def test_ablation_is_a_variant_record(toy, opts):
    record = czsl_bench.run("csp", "toy", seed=0, overrides=CSP_FAST, ablation="no-dropout", **opts)
    assert record.variant == "no-dropout" and record.config["attr_dropout"] == 0.0
    assert record.overrides == {"epochs": 2, "batch_size": 12, "lr": 0.05, "attr_dropout": 0.0}
    path = record_path(opts["results_dir"], record.run_identity, "no-dropout", record.overrides)
    assert path.exists() and path == record.source_path
    assert path.parent.name == f"no-dropout-{record.run_identity.config_fingerprint}"
    assert find_existing(opts["results_dir"], record.run_identity, "no-dropout", record.overrides) == record


class _BadShape(Method):
    name = "bad-shape"
    Config = NoConfig

    def score(self, ctx, split):
        return torch.zeros(len(split), 2)


class _Crashes(Method):
    name = "crashes"
    Config = NoConfig

    def score(self, ctx, split):
        raise ValueError("no scores today")


@pytest.fixture
def broken_methods():
    METHODS.register()(_BadShape)
    METHODS.register()(_Crashes)
    yield
    METHODS.unregister("bad-shape")
    METHODS.unregister("crashes")


def test_failures_are_one_line(toy, opts, broken_methods):
    with pytest.raises(api.RunError, match=r"returned scores of shape \(9, 2\).*expected \(9, 9\)"):
        czsl_bench.run("bad-shape", "toy", **opts)
    outcome = api.execute(api.RunSpec("crashes", "toy", 0, ("closed",)), api.RunOptions(**opts))
    assert outcome.error == "no scores today" and outcome.records == []


def test_plan_expands_the_grid_and_all(toy, monkeypatch):
    specs, missing = api.plan("clip,csp", "toy", "0,1", "both")
    assert [(s.method, s.seed) for s in specs] == [("clip", 0), ("clip", 1), ("csp", 0), ("csp", 1)]
    assert specs[0].settings == ("closed", "open")
    monkeypatch.setattr(api, "dataset_status", lambda root=None: (["toy"], {"mit-states": "run data prepare"}))
    specs, missing = api.plan("clip", "all")
    assert [s.dataset for s in specs] == ["toy"] and missing == {"mit-states": "run data prepare"}
    with pytest.raises(LookupError, match="unknown method 'clipp'. Did you mean clip"):
        api.plan("clipp", "toy")
    with pytest.raises(ValueError, match="seed 'x' is not an integer"):
        api.parse_seeds("0,x")


def test_default_backbones():
    assert api.default_backbone("synthetic", None, None) == ("czsl-tiny-vit", "synthetic")
    assert api.default_backbone(api.dataset_plugin("synthetic"), None, None) == ("czsl-tiny-vit", "synthetic")
    assert api.dataset_plugin("synthetic").default_backbone == ("czsl-tiny-vit", "synthetic")
    assert api.default_backbone("mit-states", None, None) == ("ViT-L-14-quickgelu", "openai")
    assert api.default_backbone("mit-states", "ViT-B-32", None) == ("ViT-B-32", "openai")
    assert api.default_backbone("synthetic", None, "none") == ("czsl-tiny-vit", None)
    assert api.default_backbone("ut-zappos", None, "/w/ckpt.pt") == ("ViT-L-14-quickgelu", "/w/ckpt.pt")


# -- the CLI ----------------------------------------------------------------------------------
def _cli(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_runs_and_skips(toy, tmp_path):
    base = ["run", "clip,csp", "--dataset", "toy", "--seed", "0", "--backbone", "czsl-tiny-vit",
            "--pretrained", "none", "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"),
            "--set", "epochs=1", "-q"]
    # --set keys must exist for every method named: clip has no `epochs`
    result = _cli(*base)
    assert result.exit_code == 2 and "unknown config key 'epochs' for CLIPConfig" in result.output
    csp = ["run", "csp", *base[2:-3], "--set", "epochs=1", "--set", "batch_size=12", "-q"]
    result = _cli(*csp)
    assert result.exit_code == 0, result.output
    assert "csp toy seed0: closed: AUC" in result.output
    [path] = (tmp_path / "r" / "csp" / "toy" / TINY_DIR / "closed").glob("custom-*/seed0.json")
    record = json.loads(path.read_text())
    assert record["config"]["epochs"] == 1 and record["overrides"] == {"epochs": 1, "batch_size": 12}
    result = _cli(*csp, "--skip-existing")
    assert result.exit_code == 0
    assert f"skipped: same fingerprint {record['fingerprint'][:8]} at {path}" in result.output


def test_cli_exit_codes(toy, tmp_path, broken_methods):
    out = str(tmp_path / "r")
    assert _cli("run", "clip", "--dataset", "nope", "--results-dir", out).exit_code == 2
    assert _cli("run", "clip", "--dataset", "toy", "--seed", "-1", "--results-dir", out).exit_code == 2
    assert _cli("run", "clip", "--dataset", "toy", "--ablation", "nope", "--results-dir", out).exit_code == 2
    result = _cli("run", "crashes", "--dataset", "toy", "--backbone", "czsl-tiny-vit", "--pretrained", "none",
                  "--results-dir", out, "-q")
    assert result.exit_code == 1
    assert "FAILED crashes on toy (seed 0, closed): no scores today" in result.output
