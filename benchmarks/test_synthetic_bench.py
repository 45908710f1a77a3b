"""Speed of the synthetic world and of the tiny-CLIP pretraining (targets in docs/synthetic-world.md).

Targets: the default world (5,430 images at 64 px) generated in < 60 s on 2 cores; the committed
pretraining run (20,000 web images, 500 steps of 256) in < 15 min on 2 cores. These benchmarks
measure the rates the targets depend on on a small workload; the docs page extrapolates.
"""

from __future__ import annotations

import numpy as np
import pytest

from czsl_bench.datasets.synthetic import DEFAULT_WORLD, SyntheticConfig, generate
from czsl_bench.datasets.synthetic.render import render


def test_render_64px(benchmark):
    pairs = DEFAULT_WORLD.feasible_pairs

    def run():
        for i in range(100):
            a, o = pairs[i % len(pairs)]
            render(a, o, 64, np.random.default_rng([0, i]))

    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["images_per_round"] = 100


@pytest.mark.slow
def test_generate_default_world(benchmark, tmp_path):
    roots = iter(range(10))
    benchmark.pedantic(lambda: generate(tmp_path / f"w{next(roots)}", SyntheticConfig(workers=2)),
                       rounds=1, iterations=1)
    benchmark.extra_info["images"] = 3540 + 810 + 1080


def test_pretrain_steps_batch_256(benchmark):
    from czsl_bench.datasets.synthetic import web_corpus
    from czsl_bench.pretrain import PretrainConfig, pretrain

    corpus = web_corpus(256, seed=1, image_size=64, workers=2)[:2]
    cfg = PretrainConfig(steps=3, batch_size=256, warmup_steps=1, log_every=100)
    benchmark.pedantic(lambda: pretrain(cfg, corpus=corpus, log=lambda _m: None), rounds=1, iterations=1)
    benchmark.extra_info["samples_per_round"] = 3 * 256
