"""``czsl-bench data``: check and prepare the datasets (MIT-States, UT-Zappos, C-GQA, ...)."""

from __future__ import annotations

import json
import sys

import click

IMAGE_MODES = ("none", "exists", "header", "decode")


def _plugin(name: str):
    from czsl_bench.api import dataset_plugin

    try:
        return dataset_plugin(name)  # unknown names raise a one-line RegistryError (LookupError)
    except TypeError as exc:  # a plugin that breaks the contract
        raise click.ClickException(str(exc)) from None


def _require(plugin, op: str, name: str) -> None:
    if not callable(getattr(plugin, op, None)):
        raise click.ClickException(f"dataset {name!r} does not support `data {op}`; `czsl-bench data info {name}` "
                                   "says how to obtain it")


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise click.BadParameter(f"expected KEY=VALUE, got {value!r}", param_hint=option)
        out[key] = rest
    return out


@click.group()
def data() -> None:
    """Check, prepare and describe datasets.

    A dataset's root is --root, else $CZSL_DATA/<name>, else ~/.cache/czsl-bench/data/<name>.
    """


@data.command()
@click.argument("name")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Dataset folder (default: $CZSL_DATA/<name>, else ~/.cache/czsl-bench/data/<name>).")
@click.option("--images", type=click.Choice(IMAGE_MODES), default="header", show_default=True,
              help="How hard to check images: none, exists, header (PIL identifies each file) or decode (full, slow).")
@click.option("--strict/--no-strict", default=True, show_default=True,
              help="Count differences from the published statistics as errors.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(name: str, root: str | None, images: str, strict: bool, as_json: bool) -> None:
    """Report whether dataset NAME is complete, well-formed and the standard copy.

    Lists missing files, malformed pair-file lines (file:line), metadata records whose pair is in
    no split file, missing or unreadable images, counts against the published statistics and
    whether the split files match the canonical ones (sha256). Exit 0 only when the copy is usable.
    """
    plugin = _plugin(name)
    _require(plugin, "check", name)
    report = plugin.check(root, images=images, strict=strict)
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else report.render())
    sys.exit(0 if report.usable else 1)


@data.command()
@click.argument("name")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Where to put the dataset (default: $CZSL_DATA/<name>, else ~/.cache/czsl-bench/data/<name>).")
@click.option("--url", "urls", multiple=True, metavar="KEY=URL",
              help="Download source KEY from URL instead of the built-in mirrors (repeatable).")
@click.option("--sha256", "sums", multiple=True, metavar="KEY=HEX",
              help="Expected sha256 of source KEY (repeatable; overrides the built-in checksum).")
@click.option("--splits-from", type=click.Choice(["package", "upstream"]), default="package", show_default=True,
              help="Install the split files shipped with czsl-bench, or download the TMN split tarball.")
@click.option("--delete-archives", is_flag=True, help="Delete the downloaded archives once everything is in place.")
@click.option("--strict/--no-strict", default=True, show_default=True,
              help="Require the published counts in the final check.")
def prepare(name: str, root: str | None, urls: tuple[str, ...], sums: tuple[str, ...], splits_from: str,
            delete_archives: bool, strict: bool) -> None:
    """Download, verify and reorganise dataset NAME into the standard layout (resumable).

    Re-running continues an interrupted download and skips files that are already complete and
    verified. Ends with `data check --images exists`; exit 0 when the result is usable.
    """
    plugin = _plugin(name)
    _require(plugin, "prepare", name)
    report = plugin.prepare(root, urls=_pairs(urls, "--url"), sha256=_pairs(sums, "--sha256"),
                            keep_archives=not delete_archives, splits_from=splits_from, strict=strict,
                            log=lambda line: click.echo(line, err=True))
    click.echo(report.check.render())
    sys.exit(0 if report.check.usable else 1)


@data.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(name: str, as_json: bool) -> None:
    """Show where NAME comes from, its citation, default root and published statistics."""
    plugin = _plugin(name)
    _require(plugin, "info", name)
    meta = plugin.info()
    if as_json:
        click.echo(json.dumps(meta, indent=1))
        return
    click.echo(f"{meta['name']}: {meta.get('title', '')}")
    for key in ("citation", "homepage", "root", "default_root", "size"):
        if meta.get(key):
            click.echo(f"  {key}: {meta[key]}")
    for source in meta.get("sources", []):
        click.echo(f"  source {source['key']}: {', '.join(source['urls'])}"
                   + (f" (sha256 {source['sha256']})" if source.get("sha256") else ""))
    if meta.get("stats"):
        click.echo("  statistics:")
        for key, stat in meta["stats"].items():
            click.echo(f"    {key:<20} {stat['value']:>9,}  {stat['provenance']}")
