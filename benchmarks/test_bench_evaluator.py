"""Evaluator speed and memory (pytest-benchmark). Figures: docs/evaluation.md.

Run: make bench  (or: pytest benchmarks/test_bench_evaluator.py --benchmark-only)
Under `make test` each benchmark runs once as a plain test (--benchmark-disable).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from czsl_bench.evaluation import evaluate, evaluate_dense
from czsl_bench.evaluation.feasibility import evaluate_open_world, mask_scores

sys.path.insert(0, str(Path(__file__).parent))
from openworld_scale import blocks_of, make_problem  # noqa: E402

FULL = os.environ.get("CZSL_BENCH_FULL") == "1" or "--benchmark-only" in sys.argv


@pytest.fixture(scope="module")
def ow_2000x30000():
    torch.manual_seed(0)
    # the plain test suite checks the same code on a smaller problem
    img, text, gt, seen, feas, pa, po = make_problem(2000, 150, 200) if FULL else make_problem(400, 50, 60)
    scores = 100.0 * img @ text.T
    return scores, gt, seen, feas, pa, po


@pytest.fixture(scope="module")
def masked_2000x30000(ow_2000x30000):
    scores, gt, seen, feas, pa, po = ow_2000x30000
    return mask_scores(scores, feas, seen, 0.5), gt, seen, torch.ones(len(seen), dtype=torch.bool), pa, po


@pytest.fixture(scope="module")
def dense_reference(masked_2000x30000):
    """The literal protocol's result, once per module (it is the slow one)."""
    return evaluate_dense(*masked_2000x30000)


# Three ways to the same numbers on one saved open-world matrix: the literal protocol (a biased
# copy of the matrix per bias value), `evaluate` (what `czsl-bench evaluate` and a run do with a
# dense matrix: the streaming reducer) and `evaluate_open_world` (masking inside the reducer).
@pytest.mark.benchmark(group="evaluator-open-world-2000x30000")
def test_dense_reference_open_world_2000x30000(benchmark, masked_2000x30000, dense_reference):
    r = benchmark.pedantic(evaluate_dense, args=masked_2000x30000, rounds=3 if FULL else 1, iterations=1)
    benchmark.extra_info.update(images=r.n_images, pairs=r.n_pairs, n_bias=len(r.biases))
    assert 0 < r.auc < 1 and r.as_dict() == dense_reference.as_dict()


@pytest.mark.benchmark(group="evaluator-open-world-2000x30000")
def test_evaluate_dense_input_open_world_2000x30000(benchmark, masked_2000x30000, dense_reference):
    r = benchmark.pedantic(evaluate, args=masked_2000x30000, rounds=3, iterations=1)
    benchmark.extra_info.update(images=r.n_images, pairs=r.n_pairs, n_bias=len(r.biases))
    assert r.as_dict() == dense_reference.as_dict()  # identical metrics, curve and biases


@pytest.mark.benchmark(group="evaluator-open-world-2000x30000")
def test_stream_open_world_2000x30000(benchmark, ow_2000x30000, dense_reference):
    scores, gt, seen, feas, pa, po = ow_2000x30000
    r = benchmark.pedantic(evaluate_open_world, args=(scores, gt, seen, feas, 0.5, pa, po),
                           rounds=3, iterations=1)
    assert (r.auc, r.best_hm, r.attr_acc) == (dense_reference.auc, dense_reference.best_hm, dense_reference.attr_acc)


@pytest.mark.benchmark(group="evaluator-cgqa-open-world")
def test_cgqa_sized_streaming_open_world(benchmark):
    """5,098 x 278,362 (C-GQA test, open world) in a fresh process: wall time and peak RSS.

    The full size runs under --benchmark-only (or CZSL_BENCH_FULL=1); the plain test suite runs a
    1/10-sized version of the same script so CI stays fast.
    """
    args = [] if FULL else ["--images", "500", "--attrs", "60", "--objs", "100"]
    script = Path(__file__).with_name("openworld_scale.py")

    def run():
        out = subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True,
                             text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    assert res["peak_rss_mb"] < 3 * 1024, res
    assert res["n_bias"] > 1 and 0 < res["auc"] < 1, res
