"""``czsl-bench explain``: a PNG and a JSON explaining a method's scores for test images.

Thin layer over :mod:`czsl_bench.explain`. A method that trains is trained like ``run`` does,
or restored from the run's last checkpoint when one exists (``--results-dir``'s
``.checkpoints``), so explaining a finished run costs no training.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("method")
@click.option("--dataset", "-d", required=True, metavar="NAME", help="Dataset (e.g. synthetic).")
@click.option("--image", "image", default=None, metavar="PATH_IN_SPLIT",
              help="An image by its path relative to the dataset's image root (as in the split).")
@click.option("--index", "index", default=None, metavar="N|A-B|A,B",
              help="Image index(es) in the split; several make a contact sheet.")
@click.option("--n", "n_images", type=click.IntRange(min=1), default=None,
              help="Batch mode: N images spread over the split (seen and unseen), as a contact sheet.")
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True, help="Pairs to explain per image.")
@click.option("--split", "split_name", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--world", type=click.Choice(["closed", "open"]), default="closed", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("explanations"),
              show_default=True, help="Folder for the PNG and JSON files.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="The run's seed (LaZSL: the crop seed).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value (repeatable).")
@click.option("--ablation", default=None, metavar="NAME", help="Explain a named ablation of the method.")
@click.option("--deletion", type=click.Choice(["box", "window"]), default=None,
              help="Also run the deletion test on these images: grey out the explained region (the top "
                   "descriptor's top crop box, or the best quarter-area window of the evidence map) vs random ones.")
@click.option("--backbone", metavar="ARCH", default=None, help="open_clip architecture (default: the dataset's).")
@click.option("--pretrained", metavar="TAG|PATH|none", default=None, help="Weights of --backbone.")
@click.option("--results-dir", type=click.Path(file_okay=False), default="results", show_default=True,
              help="Where the run's checkpoints live (trained methods).")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Root of the dataset.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Feature cache folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def explain(method, dataset, image, index, n_images, top, split_name, world, out_dir, seed, overrides, ablation,
            deletion, backbone, pretrained, results_dir, device, data_root, cache_dir, quiet):
    """Explain METHOD's scores for one or more test images: PNG + JSON in --out.

    \b
    Examples:
      czsl-bench explain lazsl --dataset synthetic --index 0
      czsl-bench explain lazsl --dataset synthetic --image wet_apple/test_3.png --top 3
      czsl-bench explain csp --dataset synthetic --n 16          # contact sheet
      czsl-bench explain lazsl --dataset synthetic --n 200 --deletion box   # faithfulness numbers
    """
    from czsl_bench import explain as ex
    from czsl_bench.config import ConfigError, parse_overrides
    from czsl_bench.registry import METHODS, RegistryError

    if sum(x is not None for x in (image, index, n_images)) != 1:
        raise click.UsageError("give exactly one of --image PATH, --index N (or A-B) and --n COUNT")
    try:
        cls = METHODS.get(method)
        parse_overrides(list(overrides), cls.Config)
        if ablation is not None and ablation not in cls.ablations():
            raise click.BadParameter(f"method {method!r} has no ablation {ablation!r}", param_hint="--ablation")
    except (RegistryError, ConfigError) as exc:
        raise click.UsageError(str(exc)) from None

    from czsl_bench.cli.progress import RichProgress

    with RichProgress(enabled=not quiet) as progress:
        m, ctx = ex.prepare(method, dataset, seed, backbone=backbone, pretrained=pretrained, overrides=overrides,
                            ablation=ablation, results_dir=results_dir, device=device, data_root=data_root,
                            cache_dir=cache_dir, progress=progress)
        split = ctx.split(split_name, world)
        if image is not None:
            if image not in split.images:
                raise click.BadParameter(f"{image!r} is not an image of the {split_name} split "
                                         f"(e.g. {split.images[0]!r})", param_hint="--image")
            indices = [split.images.index(image)]
        elif index is not None:
            try:
                indices = ex.parse_indices(index, len(split))
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--index") from None
        else:
            indices = ex.spread_indices(split, n_images)
        expls = []
        with progress.task(f"explain {method}", total=len(indices)) as task:
            for i in indices:
                expls.append(ex.explain_one(m, ctx, split, i, top))
                task.advance()
        stem = f"{method}{'-' + ablation if ablation else ''}-{dataset}-{split_name}"
        written = []
        if len(expls) == 1:
            e = expls[0]
            written.append(ex.render(e, split, out_dir / f"{stem}-{e['index']}.png"))
            written.append(ex.write_json(e, out_dir / f"{stem}-{e['index']}.json"))
        else:
            written.append(ex.contact_sheet(expls, split, out_dir / f"{stem}-sheet.png"))
            written.append(ex.write_json(expls, out_dir / f"{stem}-sheet.json"))
        if deletion is not None:
            test = getattr(m, "deletion_test", None)
            if test is None:
                raise click.ClickException(f"method {method!r} has no regions to delete; --deletion needs a "
                                           "region-based method (lazsl)")
            result = test(ctx, split, indices, target=deletion)
            written.append(ex.write_json(result, out_dir / f"{stem}-deletion-{deletion}.json"))
            click.echo(f"deletion over {result['images']} images: explained region {result['mean_drop_explained']:.4f}"
                       f" vs random {result['mean_drop_random']:.4f} mean score drop "
                       f"(difference {result['mean_difference']:.4f} ± {result['difference_stderr']:.4f} s.e.)")
    for path in written:
        click.echo(f"wrote {path}")
