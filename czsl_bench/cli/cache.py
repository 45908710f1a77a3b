"""``czsl-bench cache``: list and clear the on-disk caches under one root: frozen features
(czsl_bench.cache) and decoded images (czsl_bench.image_cache)."""

from __future__ import annotations

import json

import click

_ROOT_HELP = "Cache directory (default: $CZSL_CACHE, else ~/.cache/czsl-bench)."


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@click.group()
def cache() -> None:
    """Inspect or empty the caches of frozen features and decoded images."""


def _entries(root: str | None) -> tuple[object, list]:
    """Both stores under ``root`` and their entries, newest first."""
    from czsl_bench.cache import FeatureCache
    from czsl_bench.image_cache import ImageCache

    features = FeatureCache(root)
    entries = features.entries() + ImageCache(features.root).entries()
    entries.sort(key=lambda e: e.created, reverse=True)
    return features, entries


@cache.command("ls")
@click.option("--root", type=click.Path(file_okay=False), default=None, help=_ROOT_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per entry.")
def ls(root: str | None, as_json: bool) -> None:
    """List cache entries, newest first."""
    store, entries = _entries(root)
    if as_json:
        for e in entries:
            click.echo(
                json.dumps(
                    {"key": e.key, "kind": e.kind, "bytes": e.size_bytes, "created": e.created,
                     "path": str(e.path), "parts": e.parts, "meta": e.meta},
                    sort_keys=True,
                )
            )
        return
    click.echo(f"cache root: {store.root}")
    if not entries:
        click.echo("no entries")
        return
    from tabulate import tabulate

    rows = []
    for e in entries:
        what = ", ".join(f"{k}={v}" for k, v in e.meta.items() if k in ("arch", "dataset", "split", "template", "n", "error"))
        rows.append([e.key[:12], e.kind, _human(e.size_bytes), e.created, what])
    click.echo(tabulate(rows, headers=["key", "kind", "size", "created (UTC)", "content"]))
    total = sum(e.size_bytes for e in entries)
    click.echo(f"{len(entries)} entries, {_human(total)}")


@cache.command("clear")
@click.option("--root", type=click.Path(file_okay=False), default=None, help=_ROOT_HELP)
@click.option("--kind", default=None,
              help="Only entries of this kind (image_features, pair_text_features, decoded_images).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def clear(root: str | None, kind: str | None, yes: bool) -> None:
    """Delete cache entries (all, or one kind).

    Without --kind, also deletes the partial synthetic world folders of generations that were
    killed (their owner process is gone); complete worlds are kept.
    """
    from czsl_bench.image_cache import KIND, ImageCache

    store, entries = _entries(root)
    entries = [e for e in entries if kind is None or e.kind == kind]
    if not entries and kind is not None:
        click.echo(f"no {kind} entries in {store.root}")
        return
    total = sum(e.size_bytes for e in entries)
    what = f"{len(entries)} {kind + ' ' if kind else ''}entries ({_human(total)}) from {store.root}"
    if entries and not yes:
        click.confirm(f"Delete {what}?", abort=True)
    removed = 0
    if kind in (None, KIND):
        removed += ImageCache(store.root).clear()
    if kind != KIND:
        removed += store.clear(kind)
    click.echo(f"deleted {removed} {kind + ' ' if kind else ''}entries ({_human(total)})")
    if kind is None:
        _clear_stale_partials(store.root)


def _clear_stale_partials(root) -> None:
    """Remove the folders that killed synthetic world generations left behind (their owner is gone)."""
    from czsl_bench.datasets.synthetic import default_cache_dir
    from czsl_bench.datasets.synthetic.store import clean_stale_partials

    removed = []
    for folder in dict.fromkeys([root / "synthetic", default_cache_dir()]):
        removed += clean_stale_partials(folder)
    if removed:
        size = sum(n for _, n in removed)
        click.echo(f"deleted {len(removed)} partial synthetic world folder(s) left by killed generations "
                   f"({_human(size)}): {', '.join(str(p) for p, _ in removed)}")
