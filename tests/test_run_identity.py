"""Run identity (czsl_bench.identity): one test per defect the run-identity refactor fixes.

1. ``--skip-existing`` skipped a run whose config differed from the recorded one (it looked at
   method/dataset/seed only); it now decides by fingerprint and says which record it found.
2. A table cell averaged seeds run on different weights (pretrained and random).
3. ``--resume`` continued a checkpoint trained on other backbone weights.
4. A third-party dataset plugin had no contract: no ``data check`` / ``data info``, and the
   harness picked its backbone by dataset name.
5. ``run --dataset /path/to/root`` (a folder in the standard layout) was not accepted.
6. Schema-1 records: read in memory with what they could not know said, rewritten by
   ``czsl-bench records migrate``.
7. Config: the paper's names (ClusPro's ``mu``, ``K``) as aliases, a close-match hint for a
   wrong case, and where each resolved value came from.

Runs are end to end on the 3 x 3 toy world with the real tiny open_clip architecture.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import czsl_bench
from czsl_bench import api
from czsl_bench.cli import cli
from czsl_bench.config import ConfigError, config_to_dict, resolve
from czsl_bench.datasets.plugin import DatasetPlugin
from czsl_bench.identity import RANDOM_INIT, differing_fields
from czsl_bench.records import RESERVED_NAMES, find_existing, load_records, read_record, write_record
from czsl_bench.registry import DATASETS, METHODS
from czsl_bench.tables import build_table, split_by_backbone, to_markdown
from fixtures.records import make_run_record, metrics4
from fixtures.toy_world import ToyPlugin, registered_toy_dataset, write_toy_world

TINY = ["--backbone", "czsl-tiny-vit", "--pretrained", "none"]
TINY_DIR = "czsl-tiny-vit-random"
DRAWING = "template=a drawing of {attr} {obj}"
CSP_FAST = ["epochs=2", "batch_size=12", "lr=0.05"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    with registered_toy_dataset(tmp_path_factory.mktemp("toy")) as root:
        yield root


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# -- 1. --skip-existing decides by fingerprint ---------------------------------------------------


def test_skip_existing_runs_a_changed_config_and_names_what_it_skips(toy, tmp_path):
    results, cache = tmp_path / "results", tmp_path / "cache"
    base = ["run", "clip", "--dataset", "toy", "--seed", "0", *TINY, "--results-dir", str(results),
            "--cache-dir", str(cache), "-q"]
    first = _cli(*base)
    assert first.exit_code == 0, first.output
    plain_path = results / "clip" / "toy" / TINY_DIR / "closed" / "seed0.json"
    plain = read_record(plain_path)

    changed = _cli(*base, "--set", DRAWING, "--skip-existing")
    assert changed.exit_code == 0, changed.output
    assert "skipped" not in changed.output  # another configuration: it ran
    [custom_path] = (results / "clip" / "toy" / TINY_DIR / "closed").glob("custom-*/seed0.json")
    custom = read_record(custom_path)
    assert custom.config["template"] == "a drawing of {attr} {obj}"
    assert custom.overrides == {"template": "a drawing of {attr} {obj}"}
    assert custom_path.parent.name == f"custom-{custom.run_identity.config_fingerprint}"
    assert custom.fingerprint != plain.fingerprint and custom.group_fingerprint != plain.group_fingerprint
    assert differing_fields([plain.identity, custom.identity]) == ["config.template"]
    assert custom.metrics != plain.metrics  # other prompts, other scores
    assert read_record(plain_path) == plain  # the first run's record is untouched

    again = _cli(*base, "--skip-existing")
    assert again.exit_code == 0, again.output
    assert f"skipped: same fingerprint {plain.fingerprint[:8]} at {plain_path}" in again.output
    again_changed = _cli(*base, "--set", DRAWING, "--skip-existing")
    assert f"skipped: same fingerprint {custom.fingerprint[:8]} at {custom_path}" in again_changed.output
    assert sorted(p.relative_to(results).as_posix() for p in results.rglob("*.json")) == sorted(
        p.relative_to(results).as_posix() for p in (plain_path, custom_path))

    # the table keeps them apart and names what changed
    table = _cli("table", "--results-dir", str(results))
    assert table.exit_code == 0, table.output
    rows = [line.split("|")[1].strip() for line in table.stdout.splitlines()[2:] if line.startswith("|")]
    assert rows == ["CLIP", "CLIP (template='a drawing of {attr} {obj}')"]


def test_skip_existing_through_the_api_finds_the_same_fingerprint(toy, tmp_path):
    opts = dict(backbone="czsl-tiny-vit", pretrained="none", results_dir=tmp_path / "r", cache_dir=tmp_path / "c")
    record = czsl_bench.run("clip", "toy", seed=0, overrides=[DRAWING], **opts)
    assert record.source_path.is_file()
    outcome = api.execute(api.RunSpec("clip", "toy", 0, ("closed",)),
                          api.RunOptions(overrides=[DRAWING], skip_existing=True, **opts))
    assert outcome.skipped and outcome.records == [record] and outcome.skipped_paths == [str(record.source_path)]
    plain = api.execute(api.RunSpec("clip", "toy", 0, ("closed",)), api.RunOptions(skip_existing=True, **opts))
    assert not plain.skipped and plain.records[0].fingerprint != record.fingerprint
    assert find_existing(opts["results_dir"], plain.records[0].run_identity) == plain.records[0]


# -- 2. a table cell never mixes backbones or weights ------------------------------------------


def _mixed_weights():
    pretrained = make_run_record("csp", "mit-states", "closed", 0, metrics4(0.60, 0.50, 0.40, 0.30),
                                 backbone={"arch": "ViT-B-32", "pretrained": "openai", "weights_hash": "a" * 64})
    random = make_run_record("csp", "mit-states", "closed", 1, metrics4(0.10, 0.05, 0.04, 0.01),
                             backbone={"arch": "ViT-B-32", "pretrained": None, "weights_hash": "b" * 64})
    return pretrained, random


def test_build_table_never_averages_pretrained_and_random_weights():
    pretrained, random = _mixed_weights()
    assert pretrained.group_fingerprint != random.group_fingerprint
    table = build_table([pretrained, random], "closed")
    assert list(table.mean.index) == ["CSP · ViT-B-32-openai", "CSP · ViT-B-32-random"]  # labels name the weights
    assert table.mean.loc["CSP · ViT-B-32-openai", ("MIT-States", "AUC")] == pytest.approx(30.0)
    assert table.mean.loc["CSP · ViT-B-32-random", ("MIT-States", "AUC")] == pytest.approx(1.0)
    assert (table.n == 1).all().all()

    # with the backbone kept out of the labels the two configurations still get their own rows,
    # tagged by fingerprint, and the note names the fields that differ
    unlabelled = build_table([pretrained, random], "closed", backbone_in_label=False)
    assert list(unlabelled.mean.index) == [f"CSP [{pretrained.group_fingerprint[:8]}]",
                                           f"CSP [{random.group_fingerprint[:8]}]"]
    assert (unlabelled.n == 1).all().all()
    [note] = unlabelled.notes
    assert "backbone.pretrained" in note and "backbone.weights_hash" in note and "never averaged" in note
    assert "Note: " + note in to_markdown(unlabelled)

    groups = split_by_backbone([pretrained, random])
    assert {k: [r.seed for r in v] for k, v in groups.items()} == {"ViT-B-32-openai": [0], "ViT-B-32-random": [1]}


def test_same_backbone_label_other_weights_hash_is_another_row():
    """Two checkpoints under one tag (a fine-tuned file replaced in place): the hash tells them apart."""
    a = make_run_record("csp", "ut-zappos", "closed", 0, metrics4(0.5, 0.5, 0.4, 0.2),
                        backbone={"pretrained": "/w/ckpt.pt", "weights_hash": "1" * 64})
    b = make_run_record("csp", "ut-zappos", "closed", 1, metrics4(0.6, 0.6, 0.5, 0.3),
                        backbone={"pretrained": "/w/ckpt.pt", "weights_hash": "2" * 64})
    table = build_table([a, b], "closed")
    assert len(table.mean.index) == 2 and (table.n == 1).all().all()
    [note] = table.notes
    assert "backbone.weights_hash" in note and "backbone.pretrained" not in note


def test_table_cli_splits_backbones_into_tables_or_labels(tmp_path):
    for record in _mixed_weights():
        write_record(record, tmp_path)
    tables = _cli("table", "--results-dir", str(tmp_path))
    assert tables.exit_code == 0, tables.output
    assert "backbone ViT-B-32-openai: closed world" in tables.stdout
    assert "backbone ViT-B-32-random: closed world" in tables.stdout
    assert tables.stdout.count("| CSP ") == 2 and "± " not in tables.stdout  # one seed per cell
    column = _cli("table", "--results-dir", str(tmp_path), "--by-backbone", "column")
    assert column.exit_code == 0, column.output
    assert "| CSP · ViT-B-32-openai " in column.stdout and "| CSP · ViT-B-32-random " in column.stdout


def test_seeds_of_a_random_weight_configuration_share_a_group(toy, tmp_path):
    # random weights are drawn from the run seed: the identity names the init, not a per-seed hash
    records = czsl_bench.run("clip", "toy", seed="0-1", backbone="czsl-tiny-vit", pretrained="none",
                             results_dir=tmp_path / "r", cache_dir=tmp_path / "c")
    assert records[0].group_fingerprint == records[1].group_fingerprint
    assert records[0].fingerprint != records[1].fingerprint
    assert records[0].identity["backbone"]["weights_hash"] == RANDOM_INIT
    # the record still stores the hash of the weights it ran on
    assert records[0].backbone["weights_hash"] != records[1].backbone["weights_hash"]


# -- 3. resume never continues a checkpoint of other weights ---------------------------------------


def test_resume_never_continues_a_checkpoint_of_other_weights(toy, tmp_path):
    opts = dict(backbone="czsl-tiny-vit", results_dir=tmp_path / "results", cache_dir=tmp_path / "cache",
                overrides=CSP_FAST, resume=True)
    random = czsl_bench.run("csp", "toy", seed=0, pretrained="none", **opts)
    assert random.environment["training"]["resumed_from"] is None  # nothing to resume yet
    # the packaged tiny weights: same architecture, method config, dataset and seed, other weights
    trained = czsl_bench.run("csp", "toy", seed=0, pretrained="synthetic", **opts)
    assert trained.backbone["weights_hash"] != random.backbone["weights_hash"]
    assert trained.environment["training"]["resumed_from"] is None  # trained from scratch
    assert len(trained.environment["training"]["history"]) == 2

    fp_random = api.training_fingerprint(random.run_identity)
    fp_trained = api.training_fingerprint(trained.run_identity)
    assert fp_random != fp_trained
    checkpoints = tmp_path / "results" / ".checkpoints" / "csp" / "toy"
    dir_random, dir_trained = checkpoints / fp_random, checkpoints / fp_trained
    spec = api.RunSpec("csp", "toy", 0, ("closed",))
    assert api._checkpoint_dir(api.RunOptions(results_dir=tmp_path / "results"), spec, fp_random) == dir_random
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted([fp_random, fp_trained])
    assert (dir_random / "last.pt").is_file() and (dir_trained / "last.pt").is_file()

    # the same weights again: resumed (a finished run, nothing retrained)
    again = czsl_bench.run("csp", "toy", seed=0, pretrained="none", **opts)
    assert again.environment["training"]["resumed_from"] == 2 and again.metrics == random.metrics

    # a checkpoint of other weights at this run's path (copied by hand) is refused, not continued
    shutil.copy(dir_random / "last.pt", dir_trained / "last.pt")
    with pytest.raises(api.RunError, match=r"written by another run \(method config, backbone, weights"):
        czsl_bench.run("csp", "toy", seed=0, pretrained="synthetic", **opts)


# -- 4. a third-party dataset plugin --------------------------------------------------------------


class AcmeShapes(DatasetPlugin):
    """What a third-party package registers: load() and its root; the rest is declared."""

    name = "acme-shapes"
    title = "ACME shapes (a third-party plugin)"
    default_backbone = ("czsl-tiny-vit", None)
    cpu_sized = True
    recipe = "ut-zappos"

    def __init__(self, root: Path):
        self.root = Path(root)

    def resolve_root(self, root=None) -> Path:
        return Path(root) if root else self.root

    def load(self, root=None):
        from czsl_bench.datasets.czsl_format import CZSLDataset

        return CZSLDataset.from_root(self.resolve_root(root), name=self.name)


@pytest.fixture
def acme(tmp_path):
    root = write_toy_world(tmp_path / "acme")
    DATASETS.register("acme-shapes")(AcmeShapes(root))
    try:
        yield root
    finally:
        DATASETS.unregister("acme-shapes")


def test_a_third_party_plugin_gets_data_check_info_and_its_default_backbone(acme, tmp_path):
    assert api.dataset_plugin("acme-shapes").declarations() == {
        "default_backbone": {"arch": "czsl-tiny-vit", "pretrained": None}, "cpu_sized": True,
        "feasibility": "backbone-token-embeddings", "recipe": "ut-zappos", "name_policy": "dots"}

    check = CliRunner().invoke(cli, ["data", "check", "acme-shapes", "--root", str(acme)])
    assert check.exit_code == 0, check.output
    assert "acme-shapes: usable (0 error(s)" in check.output and "images checked (header): 57" in check.output
    missing = CliRunner().invoke(cli, ["data", "check", "acme-shapes", "--root", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "does not exist" in missing.output

    info = CliRunner().invoke(cli, ["data", "info", "acme-shapes"])
    assert info.exit_code == 0, info.output
    assert "acme-shapes: ACME shapes" in info.output and str(acme) in info.output
    meta = json.loads(CliRunner().invoke(cli, ["data", "info", "acme-shapes", "--json"]).output)
    assert meta["default_backbone"] == {"arch": "czsl-tiny-vit", "pretrained": None}
    assert meta["recipe"] == "ut-zappos" and meta["root"] == str(acme)

    # no --backbone: the run uses the backbone the plugin declares, and the recipe it declares
    results = tmp_path / "results"
    run = _cli("run", "clip", "--dataset", "acme-shapes", "--results-dir", str(results),
               "--cache-dir", str(tmp_path / "cache"), "-q")
    assert run.exit_code == 0, run.output
    [path] = (results / "clip" / "acme-shapes").glob("*/closed/seed0.json")
    record = read_record(path)
    assert record.backbone["arch"] == "czsl-tiny-vit" and record.backbone["pretrained"] is None
    assert path.parent.parent.name == TINY_DIR
    assert record.run_identity.dataset["name"] == "acme-shapes"
    assert api.default_backbone("acme-shapes", None, None) == ("czsl-tiny-vit", None)
    assert api.resolve_method_config(METHODS.get("csp"), "acme-shapes").config == \
        METHODS.get("csp").Config.defaults("ut-zappos")


def test_a_plugin_that_breaks_the_contract_is_one_line(tmp_path):
    class NotAPlugin:
        name = "not-a-plugin"

        def load(self, root=None):
            raise AssertionError("never loaded")

    DATASETS.register("not-a-plugin")(NotAPlugin())
    try:
        with pytest.raises(TypeError, match="must be an instance of czsl_bench.datasets.plugin.DatasetPlugin"):
            api.dataset_plugin("not-a-plugin")
        result = CliRunner().invoke(cli, ["data", "info", "not-a-plugin"])
        assert result.exit_code == 1 and "must be an instance of" in result.output
    finally:
        DATASETS.unregister("not-a-plugin")

    bad = ToyPlugin(tmp_path)
    bad.recipe = "imagenet"
    DATASETS.register("bad-recipe")(bad)
    try:
        with pytest.raises(ValueError, match="declares recipe 'imagenet'; use one of mit-states, ut-zappos, cgqa"):
            api.dataset_plugin("bad-recipe")
    finally:
        DATASETS.unregister("bad-recipe")


# -- 5. --dataset /path/to/root ------------------------------------------------------------------


def test_run_on_a_folder_in_the_standard_layout(toy, tmp_path):
    root = write_toy_world(tmp_path / "shapes")
    results = tmp_path / "results"
    result = _cli("run", "clip", "--dataset", str(root), *TINY, "--results-dir", str(results),
                  "--cache-dir", str(tmp_path / "cache"), "-q")
    assert result.exit_code == 0, result.output
    path = results / "clip" / "shapes" / TINY_DIR / "closed" / "seed0.json"
    record = read_record(path)
    assert record.dataset == "shapes" and record.run_identity.dataset["name"] == "shapes"
    # the version is the content's: the same world registered as `toy` has the same one
    assert record.run_identity.dataset["version"] == api.load_dataset("toy").version
    assert record.n_images == {"val": 9, "test": 12}
    check = CliRunner().invoke(cli, ["data", "check", str(root)])
    assert check.exit_code == 0, check.output
    missing = CliRunner().invoke(cli, ["run", "clip", "--dataset", str(tmp_path / "nowhere"),
                                       "--results-dir", str(results)])
    assert missing.exit_code in (1, 2) and "Traceback" not in missing.output  # before anything runs
    assert [line for line in missing.output.splitlines() if line.startswith("Error:")] == [
        f"Error: --dataset {tmp_path / 'nowhere'}: no such folder; give a dataset name (`czsl-bench list`) "
        "or a folder in the standard layout (docs/datasets.md)"]


# -- 6. schema-1 records --------------------------------------------------------------------------


def _as_v1(record) -> dict:
    """``record`` as czsl-bench 0.1 wrote it: no identity, fingerprint or overrides."""
    data = json.loads(record.to_json())
    for name in ("identity", "fingerprint", "overrides"):
        data.pop(name)
    data["schema_version"] = 1
    return data


def _v1_path(results: Path, record) -> Path:
    """The schema-1 layout: <results>/<method>/<dataset>/<setting>[/variants/<v>]/seed<k>.json."""
    base = results / record.method / record.dataset / record.setting
    if record.variant:
        base = base / "variants" / record.variant
    return base / f"seed{record.seed}.json"


def test_a_schema_1_record_is_read_with_its_unknowns_said(toy, tmp_path):
    fresh = czsl_bench.run("clip", "toy", seed=0, backbone="czsl-tiny-vit", pretrained="none", write=False,
                           results_dir=tmp_path / "unused", cache_dir=tmp_path / "cache")
    old = _v1_path(tmp_path / "results", fresh)
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps(_as_v1(fresh)))
    record = read_record(old)
    assert record.schema_version == 2 and record.metrics == fresh.metrics
    assert record.identity["dataset"] == {"name": "toy", "version": None}
    assert record.run_identity.unknown_fields() == ["dataset.version"]
    assert record.notes == "migrated from schema 1; unknown: dataset.version"
    assert record.provenance["migrated_from_schema"] == 1
    assert record.fingerprint == record.run_identity.fingerprint != fresh.fingerprint  # the version is missing
    # everything else it could know, it knows
    assert differing_fields([record.identity, fresh.identity]) == ["dataset.version"]
    assert [r.fingerprint for r in load_records(tmp_path / "results", exclude=RESERVED_NAMES)] == [record.fingerprint]


def test_records_migrate_rewrites_schema_1_at_the_new_path(toy, tmp_path):
    results = tmp_path / "results"
    fresh = czsl_bench.run("clip", "toy", seed=0, backbone="czsl-tiny-vit", pretrained="none", write=False,
                           results_dir=results, cache_dir=tmp_path / "cache")
    csp_cls = METHODS.get("csp")
    ablation_config = config_to_dict(resolve(csp_cls, "mit-states", ablation="no-dropout").config)
    ablation = make_run_record("csp", "toy", "closed", 1, metrics4(0.5, 0.4, 0.3, 0.2), variant="no-dropout",
                               config=ablation_config, backbone=fresh.backbone)
    copy = make_run_record("csp", "toy", "closed", 1, metrics4(0.5, 0.4, 0.3, 0.2), variant="no-dropout-copy",
                           config=ablation_config, backbone=fresh.backbone,
                           notes="record copied, not re-run (same configuration as no-dropout)")
    paths = {}
    for name, rec in (("plain", fresh), ("ablation", ablation), ("copy", copy)):
        paths[name] = _v1_path(results, rec)
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_text(json.dumps(_as_v1(rec)))
    before = {p: p.read_text() for p in paths.values()}

    dry = CliRunner().invoke(cli, ["records", "migrate", str(results), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"would move {paths['plain']} -> " in dry.output and "2 record(s) to migrate" in dry.output
    assert {p: p.read_text() for p in paths.values()} == before  # nothing written

    result = CliRunner().invoke(cli, ["records", "migrate", str(results), "--dataset-version", "auto"])
    assert result.exit_code == 0, result.output
    assert "2 record(s) migrated" in result.output
    assert not any(p.exists() for p in paths.values())  # moved, and the redundant copy removed
    version = api.load_dataset("toy").version

    new_plain = results / "clip" / "toy" / TINY_DIR / "closed" / "seed0.json"
    assert f"moved {paths['plain']} -> {new_plain} (dataset version {version})" in result.output
    assert json.loads(new_plain.read_text())["schema_version"] == 2
    migrated = read_record(new_plain)
    assert migrated.identity["dataset"] == {"name": "toy", "version": version}
    assert "dataset.version filled in at migration" in migrated.notes
    # with the version filled in it is the very run a fresh run is: --skip-existing finds it
    assert migrated.identity == fresh.identity and migrated.fingerprint == fresh.fingerprint
    assert find_existing(results, fresh.run_identity) == migrated

    [new_ablation] = (results / "csp" / "toy" / TINY_DIR / "closed").glob("no-dropout-*/seed1.json")
    moved = read_record(new_ablation)
    assert moved.variant == "no-dropout" and moved.overrides == {"attr_dropout": 0.0}
    assert new_ablation.parent.name == f"no-dropout-{moved.run_identity.config_fingerprint}"
    assert sorted(p.relative_to(results).as_posix() for p in results.rglob("*.json")) == sorted(
        p.relative_to(results).as_posix() for p in (new_plain, new_ablation))

    again = CliRunner().invoke(cli, ["records", "migrate", str(results)])
    assert again.exit_code == 0 and "0 record(s) migrated" in again.output  # schema 2 is left alone


def test_records_migrate_without_a_version_leaves_it_unknown(tmp_path):
    record = make_run_record("csp", "mit-states", "closed", 0, metrics4(0.5, 0.4, 0.3, 0.2))
    old = _v1_path(tmp_path, record)
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps(_as_v1(record)))
    result = CliRunner().invoke(cli, ["records", "migrate", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "(dataset version unknown)" in result.output and not old.exists()
    [new] = (tmp_path / "csp" / "mit-states").glob("*/closed/seed0.json")
    migrated = read_record(new)
    assert migrated.identity["dataset"]["version"] is None and "unknown: dataset.version" in migrated.notes


# -- 7. config: aliases, hints, provenance ---------------------------------------------------------


def test_cluspro_takes_the_papers_names_mu_and_k():
    cluspro = METHODS.get("cluspro")
    resolved = resolve(cluspro, "synthetic", overrides=["mu=0.5", "K=3"])
    assert (resolved.config.ema_momentum, resolved.config.n_prototypes) == (0.5, 3)
    assert resolved.sources["ema_momentum"] == resolved.sources["n_prototypes"] == "--set"
    assert resolved.changed == {"ema_momentum": 0.5, "n_prototypes": 3}  # records store the field names
    assert resolve(cluspro, "synthetic", overrides=["ema_momentum=0.5", "n_prototypes=3"]).config == resolved.config
    with pytest.raises(ConfigError, match=r"unknown config key 'k' for ClusProConfig\. Did you mean K\?"):
        resolve(cluspro, "synthetic", overrides=["k=3"])

    info = CliRunner().invoke(cli, ["info", "cluspro", "--dataset", "synthetic", "--set", "mu=0.5", "--set", "K=3",
                                    "--no-params", "--json"])
    assert info.exit_code == 0, info.output
    config = json.loads(info.output)["config"]
    assert (config["ema_momentum"], config["n_prototypes"]) == (0.5, 3) and "mu" not in config
    wrong = CliRunner().invoke(cli, ["run", "cluspro", "--dataset", "synthetic", "--set", "k=3"])
    assert wrong.exit_code == 2 and "Did you mean K?" in wrong.output  # before anything runs


def test_resolve_says_where_every_value_came_from(tmp_path):
    cluspro = METHODS.get("cluspro")
    config_file = tmp_path / "cluspro.json"
    config_file.write_text(json.dumps({"lr": 0.002}))
    resolved = resolve(cluspro, "ut-zappos", config_file, "mu-0.9", ["K=3"])
    recipe = cluspro.Config.defaults("ut-zappos")
    assert resolved.sources["lr"] == f"config file {config_file}"
    assert resolved.sources["ema_momentum"] == "ablation mu-0.9"
    assert resolved.sources["n_prototypes"] == "--set"
    assert resolved.sources["batch_size"] == "recipe ut-zappos"  # the recipe's, not the class default
    assert resolved.config.batch_size == recipe.batch_size != cluspro.Config().batch_size
    assert resolved.sources["alpha"] == "class default"
    assert resolved.changed == {"lr": 0.002, "ema_momentum": 0.9, "n_prototypes": 3}
    # --set beats the ablation, the ablation beats the config file
    assert resolve(cluspro, "synthetic", None, "mu-0.9", ["mu=0.5"]).config.ema_momentum == 0.5
    clash = tmp_path / "mu.json"
    clash.write_text(json.dumps({"mu": 0.1}))
    assert resolve(cluspro, "synthetic", clash, "mu-0.9").config.ema_momentum == 0.9
    # values an ablation implies are "derived", and a record lists only what was asked for
    code = resolve(cluspro, "ut-zappos", ablation="code")
    assert code.sources["variant"] == "ablation code"
    assert code.sources["alpha"] == "derived from ablation code" and code.changed["alpha"] == 0.1
    # an ablation equal to the recipe defaults changes nothing: it is the plain run
    assert resolve(cluspro, "synthetic", ablation="mu-0.99").changed == {}
    assert api.resolve_method_config(cluspro, "synthetic", ["K=3"]).changed == {"n_prototypes": 3}


# -- the test suite's own `gpu` marker ------------------------------------------------------------


class _Item:
    def __init__(self, markers):
        self.markers, self.added = set(markers), []

    def get_closest_marker(self, name):
        return name if name in self.markers else None

    def add_marker(self, marker):
        self.added.append(marker)


@pytest.mark.parametrize("cuda", [False, True])
def test_gpu_tests_are_skipped_without_cuda(monkeypatch, cuda):
    import conftest

    monkeypatch.setattr(conftest, "_cuda_available", lambda: cuda)
    gpu, cpu = _Item({"gpu", "slow"}), _Item({"slow"})
    conftest.pytest_collection_modifyitems(None, [gpu, cpu])
    assert cpu.added == []
    if cuda:
        assert gpu.added == []
    else:
        [skip] = gpu.added
        assert skip.name == "skip" and "needs a CUDA GPU" in skip.kwargs["reason"]
