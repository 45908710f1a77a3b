"""The `table`, `list` and `info` commands: output streams, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from czsl_bench.cli import SUBCOMMANDS, cli
from czsl_bench.records import write_record
from fixtures.records import make_run_record, metrics4

REPO = Path(__file__).resolve().parents[1]
REPORTED = REPO / "results" / "reported"


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args))


def _cluspro_config(ablation: str | None = None) -> tuple[dict, dict]:
    """The resolved config of ClusPro on UT-Zappos (an ablation of it) and the fields it changes."""
    from czsl_bench.config import config_to_dict, resolve
    from czsl_bench.registry import METHODS

    resolved = resolve(METHODS.get("cluspro"), "ut-zappos", ablation=ablation)
    return config_to_dict(resolved.config), resolved.changed


def write_runs(results: Path) -> None:
    for seed, auc in enumerate((0.19, 0.21)):
        write_record(make_run_record("csp", "ut-zappos", "closed", seed, metrics4(0.6, 0.6, 0.45, auc)), results)
    config, changed = _cluspro_config("k-1")
    write_record(make_run_record("cluspro", "ut-zappos", "closed", 0, metrics4(0.7, 0.7, 0.55, 0.42),
                                 variant="k-1", config=config, overrides=changed), results)
    config, _ = _cluspro_config()
    write_record(make_run_record("cluspro", "ut-zappos", "closed", 0, metrics4(0.7, 0.76, 0.58, 0.46),
                                 config=config), results)


def test_my_subcommands_are_registered_lazily():
    assert SUBCOMMANDS["table"] == "czsl_bench.cli.table:table"
    assert SUBCOMMANDS["list"] == "czsl_bench.cli.listing:list_command"
    assert SUBCOMMANDS["info"] == "czsl_bench.cli.info:info"
    for name in ("table", "list", "info"):
        result = run_cli(name, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output


# -- table -----------------------------------------------------------------------------------------


def test_table_prints_markdown_to_stdout(tmp_path):
    write_runs(tmp_path)
    result = run_cli("table", "--results-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| Method") and "UT-Zappos AUC" in lines[0]
    assert lines[2].startswith("| CSP ") and "20.0 ± 1.4" in lines[2]
    assert lines[3].startswith("| ClusPro ") and "**46.0**" in lines[3]
    assert len(lines) == 4  # the k-1 ablation variant is not a main-table row
    assert result.stderr == ""


@pytest.mark.parametrize("fmt, marker", [("latex", r"\toprule"), ("csv", "method,name,source"), ("html", "<table")])
def test_table_formats(tmp_path, fmt, marker):
    write_runs(tmp_path)
    result = run_cli("table", "--results-dir", str(tmp_path), "--format", fmt)
    assert result.exit_code == 0, result.output
    assert marker in result.stdout


def test_table_with_reported_reads_the_published_rows(tmp_path):
    result = run_cli("table", "--results-dir", str(tmp_path), "--reported-dir", str(REPORTED), "--with-reported",
                     "--setting", "open", "--datasets", "cgqa", "--methods", "csp,cluspro")
    assert result.exit_code == 0, result.output
    rows = [line.split("|")[1].strip() for line in result.stdout.splitlines()[2:]]
    assert rows == ["CSP (paper)", "ClusPro (paper)"]
    assert "**41.6 ± 0.3**" in result.stdout


def test_table_ablation_view(tmp_path):
    write_runs(tmp_path)
    result = run_cli("table", "--results-dir", str(tmp_path), "--ablation", "cluspro", "--format", "latex")
    assert result.exit_code == 0, result.output
    assert "Variant &" in result.stdout and "\nfull &" in result.stdout and "\nk-1 &" in result.stdout
    rows = {line.split(" & ")[0]: line.split(" & ", 1)[1] for line in result.stdout.splitlines() if " & " in line}
    assert "70.0} & 70.0 & 55.0 & 42.0" in rows["k-1"]  # S ties with full: both bold
    # grid points with the full method's config (mu-0.99, k-5) are found by config: the same record
    assert rows["mu-0.99"] == rows["k-5"] == rows["full"] and "46.0" in rows["full"]


def test_table_writes_a_file_with_output(tmp_path):
    write_runs(tmp_path / "results")
    out = tmp_path / "table.tex"
    result = run_cli("table", "--results-dir", str(tmp_path / "results"), "--format", "latex", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith(r"\begin{tabular}") and result.stdout == ""


def test_table_warns_about_malformed_records_and_goes_on(tmp_path):
    write_runs(tmp_path)
    bad = tmp_path / "csp" / "ut-zappos" / "ViT-L-14-quickgelu-openai" / "closed" / "seed9.json"
    assert bad.parent.is_dir()  # beside the CSP records write_runs wrote
    bad.write_text("{ half a record")
    result = run_cli("table", "--results-dir", str(tmp_path))
    assert result.exit_code == 0
    assert result.stderr.strip() == f"Warning: skipping {bad}: not valid JSON (Expecting property name enclosed " \
                                    "in double quotes at line 1, column 3)"
    assert "| CSP " in result.stdout


def test_table_without_records_is_a_one_line_domain_error(tmp_path):
    result = run_cli("table", "--results-dir", str(tmp_path / "empty"))
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert message.startswith("Error: no closed-world records with test metrics under ")
    assert "czsl-bench run METHOD --dataset NAME" in message and "--with-reported" in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("args", [
    ["--format", "docx"], ["--setting", "both"], ["--ablation", "cluspro", "--methods", "csp"],
])
def test_table_usage_errors_exit_2(tmp_path, args):
    result = run_cli("table", "--results-dir", str(tmp_path), *args)
    assert result.exit_code == 2


def test_console_script_exit_codes(tmp_path):
    """Through the real entry point (main()): usage error 2, domain error 1, one line each."""
    def czsl(*args):
        code = "import sys; from czsl_bench.cli import main; sys.argv = ['czsl-bench', *sys.argv[1:]]; main()"
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)

    usage = czsl("table", "--format", "docx")
    assert usage.returncode == 2 and "Invalid value for '--format'" in usage.stderr
    domain = czsl("table", "--results-dir", str(tmp_path))
    assert domain.returncode == 1 and domain.stderr.count("\n") == 1 and domain.stdout == ""


# -- list ------------------------------------------------------------------------------------------


def test_list_shows_datasets_with_status():
    result = run_cli("list", "datasets")
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.stdout.splitlines()[3:] if line.strip()]
    assert "synthetic" in names
    synthetic = next(line for line in result.stdout.splitlines() if line.startswith("synthetic"))
    assert synthetic.split()[-1] == "ok"


def _check_backbone_rows(rows) -> None:
    pairs = {(r["name"], r["pretrained"]) for r in rows}
    assert ("czsl-tiny-vit", "synthetic") in pairs
    assert ("ViT-L-14-quickgelu", "openai") in pairs
    assert all(r["name"] in {"czsl-tiny-vit"} or r["name"].startswith("ViT-") for r in rows)


def test_list_backbones_includes_the_embedded_one_and_clip_vits():
    # a fresh process, as a user runs it (the next test: one that loaded the backbone already)
    code = "import sys; from czsl_bench.cli import main; sys.argv = ['czsl-bench', *sys.argv[1:]]; main()"
    result = subprocess.run([sys.executable, "-c", code, "list", "backbones", "--json"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    _check_backbone_rows(json.loads(result.stdout)["backbones"])


def test_list_backbones_in_a_process_that_loaded_the_embedded_backbone():
    """Once loaded, open_clip knows the embedded arch's config; the row must stay listed."""
    from czsl_bench.backbone import load_backbone

    load_backbone("czsl-tiny-vit", None, device="cpu")
    result = run_cli("list", "backbones", "--json")
    assert result.exit_code == 0, result.output
    _check_backbone_rows(json.loads(result.stdout)["backbones"])


def test_list_rejects_unknown_kinds():
    assert run_cli("list", "models").exit_code == 2


# -- info ------------------------------------------------------------------------------------------


@pytest.fixture
def dummy_method():
    import torch

    from czsl_bench.method import Method
    from czsl_bench.registry import METHODS, register_method

    @dataclass
    class DummyConfig:
        width: int = 4
        lr: float = 1e-3

        @classmethod
        def defaults(cls, dataset: str) -> "DummyConfig":
            return cls(width=8 if dataset == "synthetic" else 4)

    class Dummy(Method):
        name = "test-dummy-info"
        Config = DummyConfig

        def prepare(self, ctx):
            # one embedding row per primitive: the count depends on the dataset's vocabulary
            n = len(ctx.dataset.attrs) + len(ctx.dataset.objs)
            self.embedding = torch.nn.Embedding(n, self.config.width)
            self.frozen = torch.nn.Linear(3, 2).requires_grad_(False)

        def score(self, ctx, split):
            return torch.zeros(len(split), len(split.pairs))

        @classmethod
        def ablations(cls):
            return {"narrow": {"width": 2}}

    register_method("test-dummy-info")(Dummy)
    yield Dummy
    METHODS.unregister("test-dummy-info")


def test_info_resolves_the_config_without_building_the_model(dummy_method):
    result = run_cli("info", "test-dummy-info", "--dataset", "synthetic", "--set", "lr=0.5", "--no-params")
    assert result.exit_code == 0, result.output
    assert "  width = 8" in result.stdout and "  lr    = 0.5" in result.stdout
    assert "backbone    czsl-tiny-vit / synthetic" in result.stdout
    assert "ablations   narrow" in result.stdout

    narrow = run_cli("info", "test-dummy-info", "--dataset", "synthetic", "--ablation", "narrow", "--no-params", "--json")
    data = json.loads(narrow.stdout)
    assert data["config"] == {"width": 2, "lr": 0.001} and data["params"] is None


def test_info_counts_trainable_and_total_parameters(dummy_method):
    result = run_cli("info", "test-dummy-info", "--dataset", "synthetic", "--set", "width=3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    from czsl_bench.api import load_dataset

    dataset = load_dataset("synthetic")
    n_primitives = len(dataset.attrs) + len(dataset.objs)
    assert data["params"]["trainable"] == 3 * n_primitives  # only the embedding trains
    # total = trainable + the frozen Linear(3, 2) + the whole (frozen) backbone
    from czsl_bench.backbone import load_backbone

    backbone_params = sum(p.numel() for p in load_backbone("czsl-tiny-vit", None, "cpu").model.parameters())
    assert data["params"]["total"] == 3 * n_primitives + 8 + backbone_params
    assert data["backbone"] == {"arch": "czsl-tiny-vit", "pretrained": "synthetic"}


def test_info_bad_override_is_one_line(dummy_method):
    result = run_cli("info", "test-dummy-info", "--dataset", "synthetic", "--set", "widht=3", "--no-params")
    assert result.exit_code != 0
    assert "unknown config key 'widht'" in result.output and "Did you mean width?" in result.output


def test_info_unknown_method_lists_known_ones():
    result = run_cli("info", "no-such-method", "--dataset", "synthetic")
    assert result.exit_code != 0
    assert "unknown method 'no-such-method'" in result.output
