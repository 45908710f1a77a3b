"""``czsl-bench text``: description banks (czsl_bench.text_bank), e.g. how much of a dataset one covers."""

from __future__ import annotations

import json

import click


@click.group()
def text() -> None:
    """Description banks (per-pair sentences for LaZSL and PLID): inspect and generate them."""


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
    from czsl_bench import api
    from czsl_bench.text_bank import bank_for, coverage

    ds = api.load_dataset(dataset, data_root)
    try:
        loaded = bank_for(bank, ds, "pass a bank file instead")
    except ValueError as exc:  # TextBankError is one too
        raise click.ClickException(str(exc)) from None
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


@text.command("generate")
@click.argument("dataset", metavar="DATASET")
@click.option("--model", "-m", default=None, metavar="NAME_OR_PATH", show_default="facebook/opt-1.3b (PLID's)",
              help="A local folder or Hugging Face name of a causal language model.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="Output JSON Lines bank (default: <dataset root>/descriptions-<model>-<pairs>.jsonl).")
@click.option("--pairs", type=click.Choice(["open", "closed"]), default="open", show_default=True,
              help="Describe every pair of the open world (PLID) or the closed-world pairs only.")
@click.option("--num-gen", type=click.IntRange(min=1), default=64, show_default=True, help="Samples per pair.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Prompts per generate() call.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=50, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Root of the dataset.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def generate(dataset: str, model: str | None, out: str | None, pairs: str, num_gen: int, batch_size: int,
             max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int, device: str,
             data_root: str | None, quiet: bool) -> None:
    """Write a description bank for DATASET's pairs with a local causal language model
    (PLID's few-shot keyword prompt; needs `pip install 'czsl-bench[text]'`).

    Resumable: run the same command again after an interruption and it continues with the
    first pair not yet written, producing the same file as an uninterrupted run.

    \b
    Examples:
      czsl-bench text generate mit-states --model ./opt-1.3b
      czsl-bench text generate synthetic --model ./tiny-lm --num-gen 8 --out bank.jsonl
    """
    from pathlib import Path

    from czsl_bench import api
    from czsl_bench.cli.progress import RichProgress
    from czsl_bench.names import clean_name
    from czsl_bench.text_generate import DEFAULT_MODEL, GenerateSettings, TextGenerateError, generate_bank, load_model

    model = model or DEFAULT_MODEL
    ds = api.load_dataset(dataset, data_root)
    plugin = api.dataset_plugin(dataset)
    policy = getattr(plugin, "name_policy", "dots")
    pair_list = list(ds.open_pairs if pairs == "open" else ds.closed_pairs)
    if out is None:
        stem = Path(model.rstrip("/")).name or "model"
        out = str(Path(ds.root) / f"descriptions-{stem}-{pairs}.jsonl")
    settings = GenerateSettings(model=model, num_gen=num_gen, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, device=device)
    try:
        loaded = None
        from czsl_bench.text_generate import done_pairs

        already = len(done_pairs(Path(out).expanduser()))
        if already < len(pair_list):
            loaded = load_model(model, device)
        remaining = (len(pair_list) - already) * num_gen
        label = f"describe {len(pair_list) - already:,} {dataset} pairs" + (f" ({already:,} done)" if already else "")
        with RichProgress(enabled=not quiet) as progress:
            # the bar counts this session's samples only, so its time estimate is not fooled by a resume
            with progress.task(label, total=remaining) as task:
                seen: list[int | None] = [None]

                def report(done: int, total: int) -> None:
                    if seen[0] is None:
                        seen[0] = done
                    task.advance(done - seen[0])
                    seen[0] = done

                summary = generate_bank(pair_list, out, settings, lambda n: clean_name(n, policy), report, loaded)
    except TextGenerateError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{summary['path']}: {summary['pairs']:,} pairs ({summary['resumed']:,} already there, "
               f"{summary['generated']:,} generated); check it with `czsl-bench text info {summary['path']} "
               f"--dataset {dataset}`")
