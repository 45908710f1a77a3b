"""``czsl-bench backbone``: the embedded backbone (pretraining the tiny CLIP on the synthetic world)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def backbone() -> None:
    """Backbones: pretrain the embedded tiny CLIP (czsl-tiny-vit) on the synthetic web corpus."""


@backbone.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("czsl-tiny-vit"),
              show_default=True,
              help="Folder for <arch>-<tag>.safetensors and its training record; "
                   "czsl_bench/data/backbones replaces the packaged default.")
@click.option("--tag", default="synthetic", show_default=True, help="Pretrained tag (file-name suffix).")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Initialisation and batch order [default: 0].")
@click.option("--web-seed", type=click.IntRange(min=0), default=None, help="Seed of the web corpus [default: 1].")
@click.option("--n-images", type=click.IntRange(min=2), default=None, help="Web corpus size [default: 20000].")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimiser steps [default: 1500].")
@click.option("--batch-size", type=click.IntRange(min=2), default=None, help="[default: 128]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak AdamW learning rate [default: 5e-4].")
@click.option("--include-heldout", is_flag=True,
              help="Also caption the unseen val/test pairs in the web corpus (zero-shot is then no longer a "
                   "test of composition).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads [default: 2, as the committed run; other counts may change the "
                   "last bits; 1 is faster on a busy, shared machine].")
@click.option("--eval/--no-eval", "do_eval", default=True, show_default=True,
              help="Zero-shot evaluation on the synthetic val and test splits (closed world) afterwards.")
def pretrain(out_dir: Path, tag: str, seed: int, web_seed: int, n_images: int, steps: int | None, batch_size: int,
             lr: float, include_heldout: bool, threads: int, do_eval: bool) -> None:
    """Pretrain czsl-tiny-vit from scratch with the CLIP loss on the synthetic web corpus.

    Deterministic for the same options on the same machine. The default run is the committed
    checkpoint: `czsl-bench backbone pretrain --out czsl_bench/data/backbones` (about 11 min on an
    idle 2-core machine, see docs/synthetic-world.md).
    """
    from dataclasses import replace

    from czsl_bench.pretrain import PretrainConfig, evaluate_zero_shot, load_tiny, pretrain as run, save_checkpoint

    # Unset options keep PretrainConfig's defaults, which are the committed run's settings.
    given = {"seed": seed, "web_seed": web_seed, "n_images": n_images, "steps": steps, "batch_size": batch_size,
             "lr": lr, "threads": threads}
    cfg = replace(PretrainConfig(), exclude_heldout=not include_heldout,
                  **{k: v for k, v in given.items() if v is not None})
    result = run(cfg, log=click.echo)
    ckpt, rec = save_checkpoint(result, out_dir, tag)
    if do_eval:
        import json
        import time

        from czsl_bench.datasets.synthetic import SyntheticConfig, plugin

        t0 = time.perf_counter()
        dataset = plugin.load(config=SyntheticConfig(seed=cfg.world_seed))  # the default world, never env overrides
        model, tokenizer = load_tiny(ckpt)  # evaluate the saved (fp16) weights, not the fp32 ones
        result.record["zero_shot"] = {s: evaluate_zero_shot(model, tokenizer, dataset, s) for s in ("val", "test")}
        result.record["timing"]["eval_s"] = round(time.perf_counter() - t0, 1)
        save_checkpoint(result, out_dir, tag)  # rewrite the record with the zero-shot numbers
        for split, m in result.record["zero_shot"].items():
            click.echo(f"zero-shot {split}: " + json.dumps({k: m[k] for k in
                       ("auc", "best_hm", "best_seen", "best_unseen", "attr_acc", "obj_acc")}))
    click.echo(f"wrote {ckpt} and {rec}")
