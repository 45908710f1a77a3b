"""``czsl-bench list``: registered methods and datasets (with their status) and backbones."""

from __future__ import annotations

import json
import warnings

import click

KINDS = ("methods", "datasets", "backbones")
# open_clip architectures a CZSL user is likely to pick: the CLIP ViTs the papers use (ViT-L/14 for
# every published row) and their smaller siblings; `--all` lists every (arch, tag) open_clip knows.
RELEVANT_ARCHS = (
    "ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16", "ViT-B-16-quickgelu",
    "ViT-L-14", "ViT-L-14-quickgelu", "ViT-L-14-336", "ViT-L-14-336-quickgelu",
)


def plugin_rows(kind: str) -> list[dict[str, str]]:
    """name, origin, status ("ok" or "broken: reason") for every method or dataset plugin.

    Loads each plugin to learn whether it imports; a broken one is reported, never raised.
    """
    from czsl_bench.registry import DATASETS, METHODS

    registry = METHODS if kind == "methods" else DATASETS
    rows = []
    for name, origin, error in registry.status():
        rows.append({"name": name, "origin": origin, "status": "ok" if error is None else f"broken: {error}"})
    return rows


def backbone_rows(show_all: bool = False) -> list[dict[str, str]]:
    """(arch, pretrained tag) pairs from open_clip plus the embedded backbone."""
    import open_clip

    from czsl_bench.api import dataset_plugin
    from czsl_bench.registry import DATASETS

    rows = []
    # not open_clip.list_models(): once any backbone was loaded in this process the packaged
    # configs are registered with open_clip, and the embedded backbone would vanish from the list
    published = set(open_clip.list_pretrained())
    for dataset in DATASETS.names():
        try:
            arch, tag = dataset_plugin(dataset).default_backbone
        except Exception:  # noqa: BLE001 - a broken plugin shows in `list datasets`
            continue
        if (arch, tag) not in published:
            rows.append({"name": arch, "pretrained": tag or "none", "note": f"embedded, default for dataset {dataset!r}"})
    for arch, tag in open_clip.list_pretrained():
        if show_all or arch in RELEVANT_ARCHS:
            note = "weights used by the published rows" if (arch, tag) == ("ViT-L-14-quickgelu", "openai") else ""
            rows.append({"name": arch, "pretrained": tag, "note": note})
    return rows


@click.command("list")
@click.argument("kind", required=False, type=click.Choice(KINDS))
@click.option("--all", "show_all", is_flag=True, help="backbones: list every open_clip (arch, tag), not only CLIP ViTs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
def list_command(kind: str | None, show_all: bool, as_json: bool) -> None:
    """List methods and datasets (name, origin, status), or backbones.

    Without KIND lists methods and datasets. A plugin that fails to import shows as
    "broken: <reason>" and a warning; it never hides the others.
    """
    from tabulate import tabulate

    kinds = [kind] if kind else ["methods", "datasets"]
    out: dict[str, list[dict[str, str]]] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in kinds:
            out[k] = backbone_rows(show_all) if k == "backbones" else plugin_rows(k)
    for warning in caught:
        if "failed to import" in str(warning.message):
            click.echo(f"Warning: {warning.message}", err=True)

    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for i, k in enumerate(kinds):
        rows = out[k]
        if i:
            click.echo()
        click.echo(f"{k} ({len(rows)})")
        if not rows:
            click.echo("  none registered (entry-point group czsl_bench." + k + ")")
            continue
        headers = list(rows[0])
        click.echo(tabulate([[r[h] for h in headers] for r in rows], headers=headers, tablefmt="simple"))
    if kind is None:
        click.echo("\nbackbones: `czsl-bench list backbones`", err=True)
