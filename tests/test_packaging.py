"""The install layout: every package is listed, and nothing installs a top-level `datasets`."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    found = set()
    for name, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    # a sub-folder mapped by its own package-dir entry is counted once
    assert found <= listed | set(mapping), f"add to pyproject packages: {sorted(found - listed)}"


def test_every_data_folder_with_an_importable_name_is_listed():
    # setuptools treats such a folder as a package; unlisted, `pip install -e .` prints a screen of
    # "Package '...' is absent from the `packages` configuration" warnings for each one
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    unlisted = []
    for name, folder in cfg["package-dir"].items():
        base = ROOT / folder
        for sub in sorted(p for p in base.rglob("*") if p.is_dir()):
            rel = sub.relative_to(base).parts
            if not all(part.isidentifier() for part in rel) or "__pycache__" in rel:
                continue
            shipped = [f for f in sub.iterdir() if f.is_file() and f.suffix not in (".pyc", ".py")]
            package = ".".join([name, *rel])
            if shipped and package not in listed:
                unlisted.append(package)
    assert not unlisted, f"add to pyproject packages (and package-data): {unlisted}"


def test_no_top_level_datasets_or_methods_import():
    # Run from a neutral directory so the repo folders are not on sys.path.
    code = ("import importlib.util as u; import czsl_bench.datasets, czsl_bench.methods;"
            "print(u.find_spec('datasets') is None or 'site-packages/datasets' in str(u.find_spec('datasets').origin),"
            " u.find_spec('methods') is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"], out.stdout


def test_cli_help_does_not_import_torch():
    code = ("import sys\nfrom czsl_bench.cli import cli\ntry:\n    cli.main(['--help'], standalone_mode=False)\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
