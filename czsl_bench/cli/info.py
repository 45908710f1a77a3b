"""``czsl-bench info``: a method's resolved config for a dataset and its parameter counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested config dict → ``[("optim.lr", 1e-3), ...]``: the keys ``--set`` accepts."""
    out: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def count_parameters(method_cls: Any, config: Any, dataset: str, arch: str,
                     data_root: str | Path | None = None) -> dict[str, int]:
    """Trainable and total parameters of ``method_cls`` with ``config`` on ``dataset``.

    Builds the method exactly as a run does (dataset, backbone, ``prepare``) on the CPU, with a
    randomly initialised backbone: counts depend on the architecture and the dataset's
    vocabulary, not on the weights, and this keeps ``info`` offline.
    """
    import torch

    from czsl_bench.api import load_dataset
    from czsl_bench.backbone import load_backbone
    from czsl_bench.method import RunContext, parameter_counts

    try:
        data = load_dataset(dataset, data_root)
    except (OSError, ValueError):
        # Counts depend only on the vocabulary: fall back to the split files shipped with the
        # package when the images are not on this machine.
        data = _shipped_vocabulary(dataset)
        if data is None:
            raise
    from czsl_bench.api import dataset_plugin

    backbone = load_backbone(arch, None, device="cpu")
    method = method_cls(config)
    ctx = RunContext(dataset_name=dataset, dataset=data, backbone=backbone, config=config, seed=0,
                     device=torch.device("cpu"), name_policy=dataset_plugin(dataset).name_policy)
    with torch.no_grad():
        method.prepare(ctx)
    return parameter_counts(method, backbone)


def _shipped_vocabulary(dataset: str) -> Any:
    """``attrs``, ``objs`` and ``train_pairs`` from ``czsl_bench/datasets/canonical/<dataset>/``
    (the standard pair files), or None when the package ships none for ``dataset``."""
    from importlib import resources
    from types import SimpleNamespace

    from czsl_bench.datasets.czsl_format import read_pair_file

    folder = resources.files("czsl_bench.datasets") / "canonical" / dataset / "compositional-split-natural"
    if not folder.is_dir():
        return None
    splits = {s: read_pair_file(Path(str(folder / f"{s}_pairs.txt"))) for s in ("train", "val", "test")}
    pairs = [p for ps in splits.values() for p in ps]
    return SimpleNamespace(attrs=sorted({a for a, _ in pairs}), objs=sorted({o for _, o in pairs}),
                           train_pairs=splits["train"])


def method_info(method: str, dataset: str, backbone: str | None = None, pretrained: str | None = None,
                overrides: tuple[str, ...] | list[str] = (), config_file: Path | None = None,
                ablation: str | None = None) -> dict[str, Any]:
    """Everything ``info`` prints except the parameter counts (cheap: no torch unless the plugin
    imports it)."""
    from czsl_bench.api import default_backbone, resolve_method_config
    from czsl_bench.config import config_to_dict, field_aliases
    from czsl_bench.method import check_method_class
    from czsl_bench.registry import DATASETS, METHODS

    method_cls = METHODS.get(method)
    try:
        check_method_class(method_cls, f"method {method!r}")
    except TypeError as exc:  # a plugin that breaks the contract: one line, not a traceback
        raise click.ClickException(str(exc)) from None
    if dataset not in DATASETS.names():
        DATASETS.get(dataset)  # unknown name → one line listing the known ones
    resolved = resolve_method_config(method_cls, dataset, list(overrides), ablation, config_file)
    config = resolved.config
    arch, tag = default_backbone(dataset, backbone, pretrained)
    return {
        "method": method,
        "class": f"{method_cls.__module__}:{method_cls.__qualname__}",
        "dataset": dataset,
        "ablation": ablation,
        "backbone": {"arch": arch, "pretrained": tag},
        "config_class": method_cls.Config.__qualname__,
        "config": config_to_dict(config),
        "config_sources": resolved.sources,
        "config_aliases": field_aliases(method_cls.Config),
        "ablations": sorted(method_cls.ablations()),
        "_objects": (method_cls, config),
    }


@click.command("info")
@click.argument("method")
@click.option("--dataset", required=True, metavar="NAME", help="Dataset whose defaults to resolve.")
@click.option("--backbone", "arch", default=None, metavar="ARCH",
              help="open_clip architecture  [default: the dataset's (ViT-L-14-quickgelu; czsl-tiny-vit for synthetic)]")
@click.option("--pretrained", default=None, metavar="none|TAG|PATH",
              help="Weights the run would load (shown; counts use random weights, which give the same numbers).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override, repeatable.")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Config file (YAML, JSON or TOML) applied before --set.")
@click.option("--ablation", default=None, metavar="NAME", help="Resolve the config of this ablation variant.")
@click.option("--data-root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Root of the real datasets (needed to count parameters on them).")
@click.option("--no-params", is_flag=True, help="Only resolve the config; do not build the model.")
@click.option("--config-sources", "--sources", "show_sources", is_flag=True,
              help="Print where each config value came from (class default, the dataset's recipe, the "
                   "config file, the ablation, --set); implies --no-params.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
def info(method: str, dataset: str, arch: str | None, pretrained: str | None, overrides: tuple[str, ...],
         config_file: Path | None, ablation: str | None, data_root: Path | None, no_params: bool,
         show_sources: bool, as_json: bool) -> None:
    """Print METHOD's fully resolved config on a dataset and its trainable / total parameters.

    The config is resolved as a run resolves it: method defaults for the dataset < --config file <
    --ablation < --set. Counting parameters builds the method (dataset, backbone, prepare) on CPU.
    """
    details = method_info(method, dataset, arch, pretrained, overrides, config_file, ablation)
    method_cls, config = details.pop("_objects")
    no_params = no_params or show_sources
    params: dict[str, int] | None = None
    error: str | None = None
    if not no_params:
        try:
            params = count_parameters(method_cls, config, dataset, details["backbone"]["arch"], data_root)
        except Exception as exc:  # reported after the config, which is still useful
            text = str(exc).strip().splitlines()
            error = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    details["params"] = params

    if as_json:
        if error:
            details["params_error"] = error
        click.echo(json.dumps(details, indent=2))
    else:
        _print_human(details, no_params, show_sources)
    if error:
        raise click.ClickException(
            f"cannot count parameters of {method} on {dataset}: {error}; --no-params shows only the config"
        )


def _print_human(details: dict[str, Any], no_params: bool, show_sources: bool = False) -> None:
    bb = details["backbone"]
    click.echo(f"method      {details['method']}  ({details['class']})")
    click.echo(f"dataset     {details['dataset']}")
    click.echo(f"backbone    {bb['arch']} / {bb['pretrained'] or 'none (random init)'}")
    if details["ablation"]:
        click.echo(f"ablation    {details['ablation']}")
    if details["ablations"]:
        click.echo(f"ablations   {', '.join(details['ablations'])}")
    click.echo(f"config      {details['config_class']} (override any key with --set KEY=VALUE)")
    items = _flatten(details["config"])
    width = max((len(k) for k, _ in items), default=0)
    aliases = {field: alias for alias, field in details["config_aliases"].items()}
    vwidth = max((len(json.dumps(v)) for _, v in items), default=0)
    for key, value in items:
        line = f"  {key:<{width}} = {json.dumps(value)}"
        if show_sources:
            line = f"{line:<{width + vwidth + 6}}  <- {details['config_sources'].get(key, '?')}"
        if key in aliases:
            line += f"  (alias {aliases[key]})"
        click.echo(line)
    params = details["params"]
    if params is not None:
        click.echo(f"parameters  {params['trainable']:,} trainable / {params['total']:,} total"
                   " (backbone included; counted on random weights)")
    elif no_params:
        click.echo("parameters  not counted (--no-params)")
