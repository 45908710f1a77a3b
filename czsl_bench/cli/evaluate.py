"""``czsl-bench evaluate``: score a saved ``[images, pairs]`` matrix with the standard protocol.

For methods that live outside czsl-bench: save your scores and labels, get the numbers every
other method here is scored by, instead of copying the 2019 evaluator into your repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from czsl_bench.cli.params import FINITE_FLOAT

REQUIRED = ("scores", "gt_pair", "seen_mask")
OPTIONAL = ("candidate_mask", "pair_attr", "pair_obj")


def _load_tensors(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types on corrupt files
            raise click.ClickException(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise click.ClickException(
            f"{path}: cannot be read as plain tensors ({type(exc).__name__}); save a dict of tensors "
            "with torch.save or safetensors (arbitrary pickles are never loaded)") from None
    if not isinstance(obj, dict):
        raise click.ClickException(f"{path}: expected a dict of tensors with keys {', '.join(REQUIRED)}")
    return obj


def _tensors_only(data: dict, path: Path, keys: tuple[str, ...]) -> None:
    # torch.load(weights_only=True) also returns strings, lists and numbers; the evaluator would
    # then fail with a TypeError deep inside torch, or read a list of strings as nothing useful
    import torch

    for key in keys:
        value = data.get(key)
        if value is not None and not isinstance(value, torch.Tensor):
            raise click.ClickException(f"{path}: {key!r} is a {type(value).__name__}, not a tensor; save "
                                       f"every entry as a torch tensor (e.g. torch.tensor(values))")


@click.command()
@click.argument("scores_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--topk", default=1, show_default=True, help="An image is correct when its pair is in the top-k.")
@click.option("--feasibility", "feasibility_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Open world: a file with a 'feasibility' vector (one value per pair column).")
@click.option("--threshold", type=FINITE_FLOAT, help="Open world: the feasibility threshold (required with --feasibility).")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
def evaluate(scores_file: Path, topk: int, feasibility_file: Path | None, threshold: float | None,
             as_json: bool) -> None:
    """Evaluate SCORES_FILE (.pt or .safetensors: a dict with scores [N, P], gt_pair [N],
    seen_mask [P] and optionally candidate_mask, pair_attr, pair_obj [P]).

    Pick the open-world threshold on validation with the Python API
    (czsl_bench.evaluation.feasibility.search_threshold); pass it here for test.
    """
    from czsl_bench.evaluation import evaluate as run_eval
    from czsl_bench.evaluation.feasibility import evaluate_open_world

    data = _load_tensors(scores_file)
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise click.ClickException(f"{scores_file}: missing key(s) {', '.join(missing)}; "
                                   f"expected {', '.join(REQUIRED)} (+ optional {', '.join(OPTIONAL)})")
    _tensors_only(data, scores_file, REQUIRED + OPTIONAL)
    kw = {k: data.get(k) for k in OPTIONAL}
    if feasibility_file is not None:
        if threshold is None:
            raise click.UsageError("--feasibility needs --threshold (choose it on validation)")
        feas_data = _load_tensors(feasibility_file)
        feas = feas_data.get("feasibility")
        if feas is None:
            raise click.ClickException(f"{feasibility_file}: no 'feasibility' key")
        _tensors_only(feas_data, feasibility_file, ("feasibility",))
        result = evaluate_open_world(data["scores"], data["gt_pair"], data["seen_mask"], feas, threshold,
                                     kw["pair_attr"], kw["pair_obj"], topk)
    else:
        result = run_eval(data["scores"], data["gt_pair"], data["seen_mask"], kw["candidate_mask"],
                          kw["pair_attr"], kw["pair_obj"], topk)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{scores_file.name} ({result.protocol}, top-{topk})")
    for col in ("S", "U", "HM", "AUC", "attr", "obj"):
        table.add_column(col, justify="right")
    fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    s = result.summary()
    table.add_row(*(fmt(s[k]) for k in ("best_seen", "best_unseen", "best_hm", "auc", "attr_acc", "obj_acc")))
    Console().print(table)
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
