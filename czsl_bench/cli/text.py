"""``czsl-bench text``: description banks (czsl_bench.text_bank), e.g. how much of a dataset one covers."""

from __future__ import annotations

import json

import click


@click.group()
def text() -> None:
    """Inspect description banks (per-pair sentences for LaZSL-style methods)."""


@text.command("info")
@click.argument("bank", metavar="BANK")
@click.option("--dataset", "-d", required=True, metavar="NAME", help="Dataset whose pair lists to check.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Root of the dataset.")
@click.option("--json", "as_json", is_flag=True, help="Print the coverage as one JSON object.")
def info(bank: str, dataset: str, data_root: str | None, as_json: bool) -> None:
    """Coverage of BANK (a .json/.jsonl/.pkl file, or `dataset` for the dataset's own
    descriptions.json) over the dataset's train/val/test, closed- and open-world pairs.

    \b
    Examples:
      czsl-bench text info dataset --dataset synthetic
      czsl-bench text info descriptors.jsonl --dataset mit-states
    """
    from pathlib import Path

    from czsl_bench import api
    from czsl_bench.text_bank import bank_from_mapping, coverage, load_text_bank

    ds = api.load_dataset(dataset, data_root)
    if bank == "dataset":
        path = Path(ds.root) / "descriptions.json"
        if not getattr(ds, "descriptions", None):
            raise click.ClickException(f"{dataset} ships no descriptions.json; pass a bank file instead")
        loaded = bank_from_mapping(ds.descriptions, path if path.is_file() else None)
    else:
        loaded = load_text_bank(bank)
    cov = coverage(loaded, ds)
    if as_json:
        click.echo(json.dumps(cov, indent=2, sort_keys=True))
        return
    from tabulate import tabulate

    b = cov["bank"]
    click.echo(f"bank: {b['path'] or '(in memory)'} ({b['layout']}, sha256 {(b['sha256'] or '?')[:12]}): "
               f"{b['pairs']:,} pairs, {b['sentences']:,} sentences")
    rows = [[name, f"{v['covered']:,} / {v['pairs']:,}", f"{v['fallback']:,}",
             f"{v['sentences_min']} / {v['sentences_mean']:.2f} / {v['sentences_max']}"]
            for name, v in cov["lists"].items()]
    click.echo(tabulate(rows, headers=["pairs", "described", "fallback", "sentences min / mean / max"]))
    if cov["unknown_pairs"]:
        click.echo(f"{cov['unknown_pairs']:,} bank pairs are not in {dataset}'s open world "
                   f"(e.g. {', '.join(cov['unknown_examples'])}); check the names")
