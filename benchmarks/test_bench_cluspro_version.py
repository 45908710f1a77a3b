"""ClusPro version 2 (issue #11: the released line search, nHSIC in the release's trace form with a
constant width, per-problem stopping) against version 1 and against the base: one training step.

Version 1 is loaded from this repository's history (``methods/clustering.py`` and
``methods/cluspro.py`` at :data:`VERSION_1_COMMIT`, the last commit before the change) as
separate modules, so the three steps run side by side in one process on the same batch and the
same initial weights. Rounds interleave base, version 1 and version 2, each timed in process CPU
time; the ratios compare the per-side minima (the figure least disturbed by other jobs on a
shared machine). Skipped outside a git checkout. Run:
``pytest benchmarks/test_bench_cluspro_version.py --benchmark-only``; figures in docs/cluspro.md.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from czsl_bench.methods.cluspro import ClusPro, ClusProBase
from test_bench_cluspro import STEP_BUDGET, _build, _step

VERSION_1_COMMIT = "2ebff27"  # main before issue #11: ClusPro version 1
ROOT = Path(__file__).resolve().parents[1]


def _git_show(path: str) -> str:
    try:
        out = subprocess.run(["git", "show", f"{VERSION_1_COMMIT}:{path}"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"no git: {exc}")
    if out.returncode != 0:
        pytest.skip(f"{VERSION_1_COMMIT}:{path} is not in this checkout's history")
    return out.stdout


def _load(name: str, source: str):
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    exec(compile(source, f"<{VERSION_1_COMMIT}:{name}>", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def version_1():
    """ClusPro as it was at version 1 (its own clustering module, nothing shared with today's)."""
    clustering = _git_show("methods/clustering.py")
    cluspro = _git_show("methods/cluspro.py").replace(
        "from czsl_bench.methods import clustering as cl", "import _cluspro_v1_clustering as cl").replace(
        "from czsl_bench.methods.three_path import", "from _cluspro_v1_three_path import")
    assert "_cluspro_v1_clustering" in cluspro and "_cluspro_v1_three_path" in cluspro
    _load("_cluspro_v1_clustering", clustering)
    # version 1 imported the model parts from three_path.py; they live in three_path_model.py now
    _load("_cluspro_v1_three_path", "from czsl_bench.methods.three_path import *\n"
          "from czsl_bench.methods.three_path import VariantDefault, VFloat, VInt\n"
          "from czsl_bench.methods.three_path_model import *\n")
    module = _load("_cluspro_v1", cluspro)
    yield module.ClusPro
    sys.modules.pop("_cluspro_v1", None)
    sys.modules.pop("_cluspro_v1_clustering", None)
    sys.modules.pop("_cluspro_v1_three_path", None)


def test_version_2_step_cost(benchmark, version_1):
    """One round = a base step, a version-1 step and a version-2 step (same batch and initial
    weights). Version 2 must stay within the step budget of its base (issue #11) and of version 1."""
    assert getattr(version_1, "version", "1") == "1" and ClusPro.version == "2"
    sides = {"base": _build("synthetic", ClusProBase), "v1": _build("synthetic", version_1),
             "v2": _build("synthetic", ClusPro)}
    for method, ctx, batch, _ in sides.values():
        _step(method, ctx, batch)  # warm-up: allocator, prototype seeding
    times: dict[str, list[float]] = {name: [] for name in sides}

    def round_():
        loss = None
        for name, (method, ctx, batch, _) in sides.items():
            t0 = time.process_time()
            loss = _step(method, ctx, batch)
            times[name].append(time.process_time() - t0)
        return loss

    loss = benchmark.pedantic(round_, rounds=15, iterations=1)
    assert torch.isfinite(loss)
    best = {name: min(values) for name, values in times.items()}
    v2_base, v2_v1 = best["v2"] / best["base"], best["v2"] / best["v1"]
    benchmark.extra_info.update({f"{name}_cpu_s_min": round(value, 4) for name, value in best.items()})
    benchmark.extra_info.update({"v2_to_base": round(v2_base, 3), "v2_to_v1": round(v2_v1, 3),
                                 "v1_to_base": round(best["v1"] / best["base"], 3),
                                 "threads": torch.get_num_threads()})
    if not getattr(benchmark, "disabled", False):  # one disabled round is too noisy to judge
        assert v2_base <= STEP_BUDGET, f"ClusPro v2 step costs {v2_base:.2f}x its base (budget {STEP_BUDGET}x)"
        assert v2_v1 <= STEP_BUDGET, f"ClusPro v2 step costs {v2_v1:.2f}x version 1 (budget {STEP_BUDGET}x)"
