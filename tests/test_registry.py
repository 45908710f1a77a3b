"""Plugin registry: name clashes, broken plugins isolated and reported, an external plugin
package discovered through entry points, and lazy imports (``--help`` never imports torch).

Entry-point discovery is tested without installing anything: a fake ``<name>.dist-info`` folder
with ``METADATA`` and ``entry_points.txt`` is put on ``sys.path`` (the approach of submitit's
plugin tests).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from czsl_bench.registry import METHODS, Registry, RegistryError


def fake_distribution(root: Path, name: str, entry_points: dict[str, dict[str, str]],
                      modules: dict[str, str]) -> None:
    """Write modules and a ``<name>-0.1.dist-info`` declaring ``entry_points`` under ``root``."""
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    dist = root / f"{name.replace('-', '_')}-0.1.dist-info"  # wheel naming: dashes become underscores
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines.extend(f"{key} = {value}" for key, value in entries.items())
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")


EXTERNAL_METHOD = """
    from dataclasses import dataclass

    import torch

    from czsl_bench.method import Method


    @dataclass
    class ZeroConfig:
        scale: float = 1.0

        @classmethod
        def defaults(cls, dataset):
            return cls()


    class ZeroMethod(Method):
        name = "ext-zero"
        Config = ZeroConfig

        def score(self, ctx, split):
            return torch.zeros(len(split), len(split.pairs))
"""

BROKEN_MODULE = """
    raise ImportError("needs the package `missingdep`; pip install missingdep")
"""


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """A folder on sys.path for fake distributions; METHODS is re-read after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    monkeypatch.undo()
    importlib.invalidate_caches()
    for module in ("czsl_test_ext_plugin", "czsl_test_broken_plugin", "czsl_test_other_plugin"):
        sys.modules.pop(module, None)
    METHODS.refresh()


def fresh_methods() -> Registry:
    """A registry reading the real entry-point group, independent of the global one."""
    return Registry("method", "czsl_bench.methods")


# -- decorator registration --------------------------------------------------------------------------


def test_decorator_clash_is_an_error_naming_both():
    registry = Registry("method", "czsl_bench_test.none")

    @registry.register("twin")
    class First:
        pass

    class Second:
        pass

    with pytest.raises(RegistryError, match=r"'twin' is claimed twice: by .*First and by .*Second; rename one"):
        registry.register("twin")(Second)
    registry.register("twin")(First)  # the same object again is fine (module re-import)
    assert registry.get("twin") is First


def test_unknown_name_suggests_close_matches():
    registry = Registry("method", "czsl_bench_test.none")
    registry.register("cluspro")(type("ClusPro", (), {}))
    with pytest.raises(RegistryError, match=r"unknown method 'clusproo'\. Did you mean cluspro\?"):
        registry.get("clusproo")


def test_register_needs_a_name():
    registry = Registry("method", "czsl_bench_test.none")
    with pytest.raises(RegistryError, match="give it a name"):
        registry.register()(type("Nameless", (), {}))
    named = type("Named", (), {"name": "from-attribute"})
    registry.register()(named)
    assert registry.get("from-attribute") is named


# -- entry points -------------------------------------------------------------------------------------


def test_external_plugin_package_is_discovered_lazily(plugin_path):
    fake_distribution(plugin_path, "czsl-ext", {"czsl_bench.methods": {"ext-zero": "czsl_test_ext_plugin:ZeroMethod"}},
                      {"czsl_test_ext_plugin": EXTERNAL_METHOD})
    registry = fresh_methods()
    assert "ext-zero" in registry.names()
    assert "czsl_test_ext_plugin" not in sys.modules  # listed, not imported
    cls = registry.get("ext-zero")
    assert cls.__name__ == "ZeroMethod" and cls.name == "ext-zero"
    from czsl_bench.method import check_method_class

    check_method_class(cls)  # the external class satisfies the method contract


def test_broken_plugin_is_isolated_and_reported(plugin_path):
    fake_distribution(
        plugin_path, "czsl-mixed",
        {"czsl_bench.methods": {"ext-zero": "czsl_test_ext_plugin:ZeroMethod",
                                "ext-broken": "czsl_test_broken_plugin:Thing"}},
        {"czsl_test_ext_plugin": EXTERNAL_METHOD, "czsl_test_broken_plugin": BROKEN_MODULE},
    )
    registry = fresh_methods()
    with pytest.warns(UserWarning, match=r"method plugin 'ext-broken' .* failed to import: ImportError: needs"):
        status = {name: (origin, error) for name, origin, error in registry.status()}
    assert status["ext-broken"][1].startswith("ImportError: needs the package `missingdep`")
    assert status["ext-zero"] == ("czsl_test_ext_plugin:ZeroMethod", None)
    with pytest.raises(RegistryError, match=r"method 'ext-broken' .* is broken: ImportError"):
        registry.get("ext-broken")
    assert registry.get("ext-zero").name == "ext-zero"  # the others keep working


def test_entry_point_clash_between_distributions_refuses_the_name(plugin_path):
    fake_distribution(plugin_path, "czsl-one", {"czsl_bench.methods": {"ext-same": "czsl_test_ext_plugin:ZeroMethod"}},
                      {"czsl_test_ext_plugin": EXTERNAL_METHOD})
    fake_distribution(plugin_path, "czsl-two", {"czsl_bench.methods": {"ext-same": "czsl_test_other_plugin:ZeroMethod"}},
                      {"czsl_test_other_plugin": EXTERNAL_METHOD})
    registry = fresh_methods()
    with pytest.raises(RegistryError, match="name claimed twice by entry points"):
        registry.get("ext-same")
    errors = {name: error for name, _, error in registry.status()}
    assert "uninstall or rename one" in errors["ext-same"]


def test_plugin_module_that_also_decorates_itself_is_not_a_clash(plugin_path):
    """An entry point 'mod:plugin' whose module also runs @register under the same name."""
    source = """
        from czsl_bench.registry import METHODS

        class Self:
            name = "ext-self"

        METHODS.register("ext-self")(Self)
        plugin = Self
    """
    fake_distribution(plugin_path, "czsl-self", {"czsl_bench.methods": {"ext-self": "czsl_test_ext_plugin:plugin"}},
                      {"czsl_test_ext_plugin": source})
    METHODS.refresh()
    assert METHODS.get("ext-self").__name__ == "Self"


def test_list_command_shows_broken_plugins_and_keeps_the_others(plugin_path):
    from click.testing import CliRunner

    from czsl_bench.cli import cli

    fake_distribution(
        plugin_path, "czsl-mixed",
        {"czsl_bench.methods": {"ext-zero": "czsl_test_ext_plugin:ZeroMethod",
                                "ext-broken": "czsl_test_broken_plugin:Thing"}},
        {"czsl_test_ext_plugin": EXTERNAL_METHOD, "czsl_test_broken_plugin": BROKEN_MODULE},
    )
    METHODS.refresh()
    result = CliRunner().invoke(cli, ["list", "methods"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("ext-")}
    assert lines["ext-zero"].rstrip().endswith("ok")
    assert "broken: ImportError: needs the package `missingdep`" in lines["ext-broken"]
    assert "Warning: method plugin 'ext-broken'" in result.stderr

    as_json = CliRunner().invoke(cli, ["list", "methods", "--json"])
    import json

    rows = {row["name"]: row for row in json.loads(as_json.stdout)["methods"]}
    assert rows["ext-zero"]["status"] == "ok" and rows["ext-broken"]["status"].startswith("broken: ")


# -- lazy imports --------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["table", "--help"], ["list", "--help"], ["info", "--help"]])
def test_help_does_not_import_torch(argv):
    code = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from czsl_bench.cli import cli
        result = CliRunner().invoke(cli, {argv!r})
        assert result.exit_code == 0, repr(result.exception) + result.output
        heavy = sorted(m for m in ("torch", "open_clip", "torchvision", "pandas") if m in sys.modules)
        print(",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"`czsl-bench {' '.join(argv)}` imported {out.stdout.strip()}"


def test_listing_the_registry_names_does_not_import_plugins():
    code = textwrap.dedent("""
        import sys
        from czsl_bench.registry import DATASETS, METHODS
        METHODS.names(); DATASETS.names()
        print("torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_importing_a_plugin_module_directly_first_is_not_a_clash(plugin_path):
    source = """
        from czsl_bench.registry import METHODS

        class Direct:
            name = "ext-direct"

        METHODS.register("ext-direct")(Direct)
        plugin = Direct
    """
    fake_distribution(plugin_path, "czsl-direct", {"czsl_bench.methods": {"ext-direct": "czsl_test_other_plugin:plugin"}},
                      {"czsl_test_other_plugin": source})
    METHODS.refresh()
    module = importlib.import_module("czsl_test_other_plugin")  # e.g. a notebook imports it first
    assert METHODS.get("ext-direct") is module.Direct
    METHODS.refresh()  # re-reading entry points keeps it, still no clash
    assert METHODS.get("ext-direct") is module.Direct


def test_entry_point_module_registering_a_different_object_is_reported(plugin_path):
    source = """
        from czsl_bench.registry import METHODS

        class A:
            name = "ext-mixed"

        class B:
            name = "ext-mixed"

        METHODS.register("ext-mixed")(B)
        plugin = A
    """
    fake_distribution(plugin_path, "czsl-mixed-objs", {"czsl_bench.methods": {"ext-mixed": "czsl_test_ext_plugin:plugin"}},
                      {"czsl_test_ext_plugin": source})
    METHODS.refresh()
    with pytest.warns(UserWarning, match="registers a different object"):
        with pytest.raises(RegistryError, match="is broken"):
            METHODS.get("ext-mixed")
