"""``czsl-bench records``: maintain run records (migrate old schemas)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("records")
def records() -> None:
    """Maintain run records."""


@records.command("migrate")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False, exists=True), default=Path("results"))
@click.option("--to", "target", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write the migrated records under this results folder  [default: DIRECTORY]")
@click.option("--dataset-version", type=click.Choice(["auto", "none"]), default="none", show_default=True,
              help="Schema 1 kept no dataset version. auto: fill it in from the dataset copy on disk now "
                   "(say so only if the records were made on this very copy); none: leave it unknown.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Root of the datasets (auto).")
@click.option("--dry-run", is_flag=True, help="Say what would change; write nothing.")
def migrate(directory: Path, target: Path | None, dataset_version: str, data_root: str | None, dry_run: bool) -> None:
    """Rewrite old records under DIRECTORY in the current schema and identity version.

    Schema 1 records move to their schema-2 paths: each keeps its numbers, its identity is built
    from what it stored, the unknown fields are listed in its notes, and the old file is removed
    once the new one is written. Schema-2 records of identity version 1 (no method_version) are
    rewritten in place with method_version "1" and the fingerprint that gives.

    \b
    Examples:
      czsl-bench records migrate results --dry-run
      czsl-bench records migrate results --dataset-version auto
    """
    from czsl_bench.records import RESERVED_NAMES, migrate_file

    target = target or directory
    versions: dict[str, str | None] = {}
    done = 0
    for path in sorted(directory.rglob("*.json")):
        rel = path.relative_to(directory)
        if rel.parts[0] in RESERVED_NAMES or any(p.startswith(".") for p in rel.parts):
            continue
        try:
            new_path, note = migrate_file(path, target, versions if dataset_version == "auto" else None,
                                          data_root, dry_run=dry_run)
        except ValueError as exc:
            click.echo(f"skipped {path}: {exc}", err=True)
            continue
        if new_path is None:
            continue
        done += 1
        if new_path.resolve() == path.resolve():  # identity v1 -> v2: same path
            click.echo(f"{'would rewrite' if dry_run else 'rewrote'} {path} ({note})")
        else:
            click.echo(f"{'would move' if dry_run else 'moved'} {path} -> {new_path} ({note})")
    click.echo(f"{done} record(s) {'to migrate' if dry_run else 'migrated'}", err=True)
