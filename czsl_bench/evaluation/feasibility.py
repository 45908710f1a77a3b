"""Open-world feasibility: scores from primitive embeddings, the papers' vectors, masking, and
the validation threshold search applied to test.

Feasibility (CompCos, Mancini et al. CVPR'21, as CSP/PLID/Troika/ClusPro use it), for a pair
(a, o) not seen in training::

    obj_part(a, o)  = max over o' != o with (a, o') seen of cos(e_o, e_o')   (-1 if none)
    attr_part(a, o) = max over a' != a with (a', o) seen of cos(e_a, e_a')   (-1 if none)
    feas(a, o)      = (obj_part + attr_part) / 2

and 0 for seen pairs. Masking is multiplicative, ``S * (1[feas >= th] + seen)``, so infeasible
pairs score 0 and, for ``th <= 0``, seen scores double (a quirk of the reference kept for parity).
The threshold is the first of 50 evenly spaced values between the smallest and largest unseen
feasibility that maximises validation AUC (strictly greater; -10, i.e. everything feasible, when
no threshold gives a positive AUC), then applied once to test.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass, field
from importlib import resources
from typing import Sequence

import numpy as np
import torch

from .metrics import EvalResult, vector_length
from .streaming import OPEN_WORLD_FALLBACK_THRESHOLD, BlockSource, StreamingReducer

N_THRESHOLDS = 50

# sha256 of the reference vectors shipped in czsl_bench/data/feasibility (provenance: README there)
REFERENCE_SHA256 = {
    "ut-zappos": "6b5c9b142a4003d785e053386fbbc2607e8b740acdd67ac8891eb90b45a05f64",
    "mit-states": "19b78b8bdca50fcd2ce9dd04d31526cc0e9f7c20f51f54f171e7d28bf3c7257a",
    "cgqa": "6ff96ff8700e78f9446258682034995453429d48430fd9131cf45107048175f7",
}


def compute_feasibility(attr_emb, obj_emb, seen_pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Feasibility of every (attr, obj) pair, attr-major (index ``a * n_objs + o``).

    Args:
        attr_emb: ``[A, D]`` embedding per attribute (any table: GloVe, CLIP tokens, learned).
        obj_emb: ``[O, D]`` embedding per object.
        seen_pairs: (attr index, obj index) of the training pairs.
    """
    ea = torch.nn.functional.normalize(torch.as_tensor(attr_emb, dtype=torch.float64), dim=1)
    eo = torch.nn.functional.normalize(torch.as_tensor(obj_emb, dtype=torch.float64), dim=1)
    n_a, n_o = len(ea), len(eo)
    seen = torch.zeros(n_a, n_o, dtype=torch.bool)
    for a, o in seen_pairs:
        if not (0 <= a < n_a and 0 <= o < n_o):
            raise ValueError(f"seen pair ({a}, {o}) is out of range for {n_a} attributes x {n_o} objects")
        seen[a, o] = True
    cos_o, cos_a = eo @ eo.T, ea @ ea.T
    no_self_o = ~torch.eye(n_o, dtype=torch.bool)
    no_self_a = ~torch.eye(n_a, dtype=torch.bool)
    obj_part = torch.full((n_a, n_o), -1.0, dtype=torch.float64)
    for a in range(n_a):  # row by row: the [A, O, O] tensor would not fit for C-GQA
        allowed = seen[a][None, :] & no_self_o  # [o, o']
        vals = torch.where(allowed, cos_o, torch.tensor(-torch.inf, dtype=torch.float64)).max(1).values
        obj_part[a] = torch.where(torch.isinf(vals), torch.tensor(-1.0, dtype=torch.float64), vals)
    attr_part = torch.full((n_a, n_o), -1.0, dtype=torch.float64)
    for o in range(n_o):
        allowed = seen[:, o][None, :] & no_self_a  # [a, a']
        vals = torch.where(allowed, cos_a, torch.tensor(-torch.inf, dtype=torch.float64)).max(1).values
        attr_part[:, o] = torch.where(torch.isinf(vals), torch.tensor(-1.0, dtype=torch.float64), vals)
    feas = (obj_part + attr_part) / 2
    feas[seen] = 0.0
    return feas.flatten().float()


def reference_feasibility(dataset: str) -> torch.Tensor:
    """The GloVe feasibility vector CSP/Troika/ClusPro used (shipped; sha256-checked)."""
    if dataset not in REFERENCE_SHA256:
        raise ValueError(f"no reference feasibility for {dataset!r}; available: "
                         f"{', '.join(REFERENCE_SHA256)} (compute one with compute_feasibility)")
    blob = resources.files("czsl_bench").joinpath(f"data/feasibility/feasibility_{dataset}.pt")
    data = blob.read_bytes()
    if hashlib.sha256(data).hexdigest() != REFERENCE_SHA256[dataset]:
        raise ValueError(f"{blob} does not match its recorded sha256; reinstall czsl-bench")
    import io

    obj = torch.load(io.BytesIO(data), weights_only=True)
    return obj["feasibility"].float()


def threshold_grid(feasibility, seen_mask, n: int = N_THRESHOLDS) -> np.ndarray:
    """``n`` evenly spaced thresholds from the smallest to the largest unseen feasibility."""
    f = torch.as_tensor(feasibility, dtype=torch.float32)
    seen = torch.as_tensor(seen_mask).float()
    if bool(seen.bool().all()):
        raise ValueError("every pair is seen: open world needs unseen pairs to threshold")
    lo, hi = float((f + 10 * seen).min()), float((f - 10 * seen).max())
    return np.linspace(lo, hi, num=n)


def mask_scores(scores: torch.Tensor, feasibility, seen_mask, threshold: float) -> torch.Tensor:
    """Dense CSP-style masking ``S * (1[feas >= th] + seen)`` (for inspection and tests)."""
    f = torch.as_tensor(feasibility, dtype=torch.float32)
    keep = (f >= torch.tensor(threshold, dtype=torch.float64).float()).float()
    return scores * (keep + torch.as_tensor(seen_mask).float())


@dataclass
class OpenWorldResult:
    threshold: float
    val: EvalResult  # validation metrics at the chosen threshold
    test: EvalResult | None
    grid: list[float] = field(default_factory=list)
    val_auc: list[float] = field(default_factory=list)  # one per grid threshold


def search_threshold(val_scores: BlockSource, val_gt, seen_mask, feasibility, pair_attr=None,
                     pair_obj=None, topk: int = 1, n_thresholds: int = N_THRESHOLDS,
                     margin: int = 4) -> OpenWorldResult:
    """Pick the feasibility threshold on validation with one pass over the scores."""
    grid = threshold_grid(feasibility, seen_mask, n_thresholds)
    n_pairs = vector_length(seen_mask, "seen_mask")
    n_images = vector_length(val_gt, "val_gt")
    red = StreamingReducer(n_images, n_pairs, val_gt, seen_mask, None, pair_attr, pair_obj,
                           topk, feasibility=feasibility, thresholds=grid, margin=margin)
    red.consume(val_scores)
    best_auc, best_j, aucs, results = 0.0, -1, [], {}
    for j in range(len(grid)):
        r = red.evaluate(j)
        results[j] = r
        aucs.append(r.auc)
        if r.auc > best_auc:
            best_auc, best_j = r.auc, j
    val = results[best_j] if best_j >= 0 else red.evaluate(-1)
    threshold = float(grid[best_j]) if best_j >= 0 else OPEN_WORLD_FALLBACK_THRESHOLD
    if best_j < 0:
        val.warnings.append("no feasibility threshold gave a positive validation AUC; using -10 "
                            "(every pair feasible), as the reference does")
    return OpenWorldResult(threshold, val, None, [float(g) for g in grid], aucs)


def evaluate_open_world(test_scores: BlockSource, test_gt, seen_mask, feasibility, threshold: float,
                        pair_attr=None, pair_obj=None, topk: int = 1, margin: int = 4) -> EvalResult:
    """Open-world metrics with the feasibility mask at ``threshold`` (candidates: every pair)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
        raise ValueError(f"threshold {threshold!r} is not a finite number; pick it on validation "
                         "(search_threshold) and pass that value")
    n_pairs = vector_length(seen_mask, "seen_mask")
    fallback = threshold == OPEN_WORLD_FALLBACK_THRESHOLD
    n_images = vector_length(test_gt, "gt_pair")
    red = StreamingReducer(n_images, n_pairs, test_gt, seen_mask, None, pair_attr, pair_obj, topk,
                           feasibility=feasibility, thresholds=[] if fallback else [threshold],
                           margin=margin, track_all_feasible=fallback)
    red.consume(test_scores)
    result = red.evaluate(-1 if fallback else 0)
    result.threshold = float(threshold)
    return result


def open_world(val_scores: BlockSource, val_gt, test_scores: BlockSource, test_gt, seen_mask,
               feasibility, pair_attr=None, pair_obj=None, topk: int = 1, threshold: float | None = None,
               n_thresholds: int = N_THRESHOLDS) -> OpenWorldResult:
    """The papers' open-world protocol: threshold from validation (unless given), applied to test."""
    if threshold is None:
        out = search_threshold(val_scores, val_gt, seen_mask, feasibility, pair_attr, pair_obj, topk,
                               n_thresholds)
    else:
        val = evaluate_open_world(val_scores, val_gt, seen_mask, feasibility, threshold, pair_attr,
                                  pair_obj, topk)
        out = OpenWorldResult(float(threshold), val, None)
    out.test = evaluate_open_world(test_scores, test_gt, seen_mask, feasibility, out.threshold,
                                   pair_attr, pair_obj, topk)
    return out


def open_world_splits(val_scores: BlockSource, val_split, test_scores: BlockSource, test_split,
                      feasibility, topk: int = 1, threshold: float | None = None) -> OpenWorldResult:
    """:func:`open_world` with labels and masks from open-world dataset ``Split``s."""
    for sp in (val_split, test_split):
        if getattr(sp, "world", "open") != "open":
            raise ValueError(f"split {sp.name!r} is closed-world; load it with world='open'")
    return open_world(val_scores, val_split.labels, test_scores, test_split.labels,
                      test_split.seen_mask, feasibility, test_split.pair_attr, test_split.pair_obj,
                      topk, threshold)
