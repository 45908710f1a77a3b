"""The embedded benchmark end to end: CLIP and CSP on the synthetic world with the committed
backbone. Guards the calibration (docs/synthetic-world.md) and the committed run records: a change
to the world, the web corpus, the backbone or the methods that breaks either shows up here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import czsl_bench

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference"
BACKBONE_DIR = "czsl-tiny-vit-synthetic"  # the synthetic world's declared default backbone


def _committed(method: str, seed: int) -> dict:
    return json.loads((REFERENCE / method / "synthetic" / BACKBONE_DIR / "closed" / f"seed{seed}.json").read_text())


@pytest.mark.slow
def test_csp_learns_the_vocabulary_gap_and_the_committed_records_reproduce(tmp_path, monkeypatch):
    monkeypatch.setenv("CZSL_CACHE", str(tmp_path / "cache"))
    clip = czsl_bench.run("clip", "synthetic", seed=0, results_dir=tmp_path, progress=False)
    csp = czsl_bench.run("csp", "synthetic", seed=0, results_dir=tmp_path, progress=False)
    clip_auc, csp_auc = clip.metrics["test"]["auc"], csp.metrics["test"]["auc"]
    # the calibration: zero-shot far above chance and far from perfect, and room above it
    assert 0.05 <= clip_auc <= 0.40
    assert csp_auc > clip_auc + 0.01, (clip_auc, csp_auc)
    # the committed records come from this code (2 torch threads there; other thread counts
    # change the summation order, hence the tolerance)
    for record, method in ((clip, "clip"), (csp, "csp")):
        assert record.source_path == tmp_path / method / "synthetic" / BACKBONE_DIR / "closed" / "seed0.json"
        # the same run: same identity (config, weights hash, dataset version, protocol, seed)
        assert record.identity == _committed(method, 0)["identity"]
        assert record.fingerprint == _committed(method, 0)["fingerprint"]
        committed = _committed(method, 0)["metrics"]["test"]
        for key in ("auc", "best_hm", "best_seen", "best_unseen"):
            assert record.metrics["test"][key] == pytest.approx(committed[key], abs=5e-3), (method, key)
