"""The generalized CZSL protocol ("czsl-legacy-20bin"), dense path.

This is the protocol of the czsl evaluator as CSP, PLID, Troika and ClusPro run it
(docs/evaluation.md restates it; the spec is ../shared/docs/docs/evaluation.md):

* a bias ``b`` is added to every unseen pair's score (float32), non-candidates are removed,
  and an image is correct when its pair is among the top-k;
* the biases are the sorted score gaps of the unseen images that are correct at ``b = 1e3``,
  minus 1e-4, thinned to about 20 values, plus the end point ``b = 1e3``;
* AUC is the trapezoid area under seen accuracy (y) against unseen accuracy (x);
* attribute/object accuracy come from the unbiased (b = 0) top-1 inside the candidates.

Tie policy: among exactly equal scores the lowest pair index wins. This matches torch.topk on
CPU for rows of >= ~100 candidates (every real dataset) and is deterministic everywhere.
All accuracies are per-image (micro) averages.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

PROTOCOL_VERSION = "czsl-legacy-20bin/1"
MAX_BIAS = 1e3  # the end point: unseen pairs always on top
GAP_MARGIN = 1e-4  # evaluate just before each unseen image flips to correct
NUM_BINS = 20


@dataclass
class EvalResult:
    """Metrics of one evaluation; accuracies are fractions in [0, 1].

    ``best_unseen``/``best_hm``/``auc`` are NaN when the split has no unseen image and
    ``best_seen``/``best_hm``/``auc`` when it has no seen image: those numbers do not exist,
    and a 0 would be silently wrong. ``warnings`` says why.
    """

    best_seen: float
    best_unseen: float
    best_hm: float
    auc: float
    attr_acc: float | None
    obj_acc: float | None
    hm_seen: float
    hm_unseen: float
    bias: float  # the bias at best HM (1e3 when it is the end point)
    curve_seen: list[float]
    curve_unseen: list[float]
    biases: list[float]  # one per curve point; the last is the end point 1e3
    topk: int
    n_images: int
    n_seen_images: int
    n_unseen_images: int
    n_pairs: int
    n_candidates: int
    protocol: str = PROTOCOL_VERSION
    threshold: float | None = None  # open world: the feasibility threshold applied
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, float | None]:
        """The headline numbers (fractions): S, U, HM, AUC, attribute and object accuracy."""
        return {k: getattr(self, k) for k in
                ("best_seen", "best_unseen", "best_hm", "auc", "attr_acc", "obj_acc")}


# ---------------------------------------------------------------------------------------------
# input validation: every message names the argument, what is wrong and how to fix it
# ---------------------------------------------------------------------------------------------
def as_numeric(x: Any, name: str) -> torch.Tensor:
    """``x`` as a tensor, or a one-line ``ValueError`` naming ``name`` (strings, ragged lists and
    object arrays make torch raise TypeErrors that say nothing about which argument)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (str, bytes)):
        raise ValueError(f"{name} is a {type(x).__name__}, not an array; pass a tensor or NumPy array")
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{name} cannot be read as a numeric array ({first}); pass a tensor or "
                         "NumPy array of numbers") from None


def real_values(x: Any, name: str) -> torch.Tensor:
    """:func:`as_numeric`, refusing complex and boolean values: converting those to float32 would
    silently drop the imaginary part or turn a mask into scores."""
    t = as_numeric(x, name)
    if t.is_complex():
        raise ValueError(f"{name} are complex ({t.dtype}); pass real values (larger = better), e.g. "
                         "the real part or the magnitude, whichever the method means")
    if t.dtype == torch.bool:
        raise ValueError(f"{name} are boolean; pass real values (larger = better)")
    return t


def vector_length(x: Any, name: str) -> int:
    """The length of a 1-D argument (``len()`` of a 0-d tensor or an int raises a bare TypeError)."""
    t = as_numeric(x, name)
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D vector; got shape {tuple(t.shape)}")
    return t.shape[0]


def _as_bool_vector(x: Any, name: str, n: int) -> torch.Tensor:
    t = as_numeric(x, name)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but scores have {n} pair columns; "
                         f"pass one entry per pair")
    if t.dtype != torch.bool:
        if t.is_floating_point() or t.is_complex() or not ((t == 0) | (t == 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1) with one entry per pair; got {t.dtype}")
        t = t.bool()
    return t.cpu()


def _as_index_vector(x: Any, name: str, n: int, upper: int | None, what: str) -> torch.Tensor:
    t = as_numeric(x, name)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {n} entries are needed; pass one {what}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer indices; got {t.dtype}")
    t = t.long().cpu()
    if n and upper is not None and (int(t.min()) < 0 or int(t.max()) >= upper):
        bad = int(((t < 0) | (t >= upper)).nonzero()[0, 0])
        raise ValueError(f"{name}[{bad}] = {int(t[bad])} is out of range [0, {upper}); "
                         f"labels must index the pair columns of scores")
    return t


@dataclass
class _Inputs:
    gt: torch.Tensor  # [N] long
    seen_mask: torch.Tensor  # [P] bool
    candidate: torch.Tensor  # [P] bool
    pair_attr: torch.Tensor | None
    pair_obj: torch.Tensor | None
    topk: int
    n_pairs: int

    @property
    def img_unseen(self) -> torch.Tensor:
        return ~self.seen_mask[self.gt]


def validate_inputs(n_images: int, n_pairs: int, gt_pair, seen_mask, candidate_mask=None,
                    pair_attr=None, pair_obj=None, topk: int = 1) -> _Inputs:
    """Check the non-score inputs of an evaluation; raise one-line ``ValueError``s."""
    if n_images == 0:
        raise ValueError("the split is empty (0 images); check the dataset split you evaluate")
    if n_pairs == 0:
        raise ValueError("scores have 0 pair columns; score every candidate pair")
    gt = _as_index_vector(gt_pair, "gt_pair", n_images, n_pairs, "pair label per image")
    seen = _as_bool_vector(seen_mask, "seen_mask", n_pairs)
    cand = (torch.ones(n_pairs, dtype=torch.bool) if candidate_mask is None
            else _as_bool_vector(candidate_mask, "candidate_mask", n_pairs))
    if (pair_attr is None) != (pair_obj is None):
        raise ValueError("pass both pair_attr and pair_obj (or neither) to get attribute/object accuracy")
    pa = po = None
    if pair_attr is not None:
        pa = _as_index_vector(pair_attr, "pair_attr", n_pairs, None, "attribute index per pair")
        po = _as_index_vector(pair_obj, "pair_obj", n_pairs, None, "object index per pair")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive integer; got {topk!r}")
    n_cand = int(cand.sum())
    if topk > n_cand:
        raise ValueError(f"topk={topk} exceeds the {n_cand} candidate pairs; lower topk")
    if topk > 1 and pa is not None:
        pass  # attribute/object accuracy always come from the top-1 prediction (as CSP/Troika)
    not_cand = ~cand[gt]
    if not_cand.any():
        i = int(not_cand.nonzero()[0, 0])
        raise ValueError(f"image {i}'s pair (column {int(gt[i])}) is not a candidate; the candidate "
                         f"mask must include every labelled pair of the split")
    return _Inputs(gt, seen, cand, pa, po, topk, n_pairs)


def check_scores(scores: Any) -> torch.Tensor:
    """Validate a dense score matrix and return it as a float32 CPU tensor.

    Cheap: a dtype and shape check, a conversion only when the input is not float32 on the CPU
    already, and one sum for finiteness (the culprit is located only when that sum is not finite).
    """
    s = real_values(scores, "scores")
    if s.dim() != 2:
        raise ValueError(f"scores must be a 2-D [images, pairs] matrix; got shape {tuple(s.shape)}")
    s = s.detach().to("cpu", torch.float32)
    if not torch.isfinite(s.sum()):  # a finite sum means every entry is finite
        check_finite(s, "scores")
    return s


def check_finite(block: torch.Tensor, name: str, col_offset: int = 0) -> None:
    bad = ~torch.isfinite(block)
    if bad.any():
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{name} contain {int(bad.sum())} NaN/inf value(s), first at image {i}, "
                         f"pair {j + col_offset}; fix the method's scores (e.g. a diverged model)")


# ---------------------------------------------------------------------------------------------
# shared: from a seen/unseen curve to the reported numbers
# ---------------------------------------------------------------------------------------------
def bias_list(gaps_of_kept: torch.Tensor) -> torch.Tensor:
    """The protocol's bias values: sorted (gap - 1e-4), every ``len//20``-th (float32)."""
    d = torch.sort(gaps_of_kept.float() - torch.tensor(GAP_MARGIN, dtype=torch.float32)).values
    step = max(len(d) // NUM_BINS, 1)
    return d[::step]


def hmean(a: float, b: float) -> float:
    return 0.0 if a <= 0 or b <= 0 else 2.0 * a * b / (a + b)


def finish(curve_seen: list[float], curve_unseen: list[float], biases: list[float],
           attr_acc: float | None, obj_acc: float | None, inp: _Inputs, n_seen: int, n_unseen: int,
           threshold: float | None = None) -> EvalResult:
    warnings: list[str] = []
    cs, cu = np.asarray(curve_seen, dtype=np.float64), np.asarray(curve_unseen, dtype=np.float64)
    hms = np.array([hmean(s, u) for s, u in zip(cs, cu)])
    j = int(np.argmax(hms))
    nan = float("nan")
    best_seen, best_unseen = float(cs.max()), float(cu.max())
    auc, best_hm = float(np.trapezoid(cs, cu)), float(hms[j])
    if n_unseen == 0:
        warnings.append("the split has no unseen image: U, HM and AUC are undefined (NaN)")
        best_unseen = best_hm = auc = nan
    if n_seen == 0:
        warnings.append("the split has no seen image: S, HM and AUC are undefined (NaN)")
        best_seen = best_hm = auc = nan
    return EvalResult(
        best_seen=best_seen, best_unseen=best_unseen, best_hm=best_hm, auc=auc,
        attr_acc=attr_acc, obj_acc=obj_acc, hm_seen=float(cs[j]), hm_unseen=float(cu[j]),
        bias=float(biases[j]), curve_seen=cs.tolist(), curve_unseen=cu.tolist(),
        biases=[float(b) for b in biases], topk=inp.topk, n_images=len(inp.gt),
        n_seen_images=n_seen, n_unseen_images=n_unseen, n_pairs=inp.n_pairs,
        n_candidates=int(inp.candidate.sum()), threshold=threshold, warnings=warnings,
    )


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean()) if x.numel() else float("nan")


def topk_lowest_index(values: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise top-k indices, exact ties broken towards the lowest column index."""
    if k == 1:
        return values.argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    n_cols = values.shape[1]
    slack = min(n_cols, k + 8)
    top_v, top_i = values.topk(slack, dim=1)
    # Rows whose k-th value ties with the last fetched one may have lost tied lower indices.
    ambiguous = top_v[:, k - 1] == top_v[:, -1] if slack > k else torch.zeros(len(values), dtype=torch.bool)
    out = torch.empty(len(values), k, dtype=torch.long)
    clear = ~ambiguous
    if clear.any():
        v, i = top_v[clear], top_i[clear]
        order = torch.argsort(i, dim=1, stable=True)
        v, i = v.gather(1, order), i.gather(1, order)
        order = torch.argsort(v, dim=1, descending=True, stable=True)
        out[clear] = i.gather(1, order)[:, :k]
    if ambiguous.any():
        out[ambiguous] = torch.argsort(values[ambiguous], dim=1, descending=True, stable=True)[:, :k]
    return out


# ---------------------------------------------------------------------------------------------
# the dense path: the protocol written out directly
# ---------------------------------------------------------------------------------------------
def _matches(scores: torch.Tensor, inp: _Inputs, bias: torch.Tensor | float, row_chunk: int = 4096
             ) -> torch.Tensor:
    """Per image: is its pair among the top-k after adding ``bias`` to unseen pairs?"""
    out = torch.empty(scores.shape[0], dtype=torch.bool)
    b = torch.as_tensor(bias, dtype=torch.float32)
    # x + 0.0 == x, so one broadcast add is the reference's float32 "unseen += b" exactly
    bias_row = torch.where(inp.seen_mask, torch.zeros((), dtype=torch.float32), b)[None, :]
    not_candidate = ~inp.candidate[None, :]
    for r0 in range(0, scores.shape[0], row_chunk):
        s = (scores[r0:r0 + row_chunk] + bias_row).masked_fill_(not_candidate, -1e10)
        pred = topk_lowest_index(s, inp.topk)
        out[r0:r0 + row_chunk] = (pred == inp.gt[r0:r0 + row_chunk, None]).any(dim=1)
    return out


def evaluate(scores, gt_pair, seen_mask, candidate_mask=None, pair_attr=None, pair_obj=None,
             topk: int = 1) -> EvalResult:
    """Score an ``[images, pairs]`` matrix by the generalized CZSL protocol.

    Args:
        scores: float ``[N, P]``, larger = better (logits, cosines, probabilities...).
        gt_pair: ``[N]`` index of each image's pair among the P columns.
        seen_mask: ``[P]`` True for pairs seen in training.
        candidate_mask: ``[P]`` pairs allowed as predictions (closed world: train ∪ split
            pairs; open world: all). Default: all.
        pair_attr, pair_obj: ``[P]`` attribute / object index of each pair; needed for
            ``attr_acc`` / ``obj_acc`` (None otherwise).
        topk: an image is correct when its pair is among the top-k predictions.

    The matrix goes through the streaming reducer (:mod:`.streaming`): the same numbers as
    :func:`evaluate_dense`, exactly (ties included), without rescoring the matrix per bias value.
    """
    from .streaming import StreamingReducer  # streaming builds on this module

    s = check_scores(scores)
    reducer = StreamingReducer(s.shape[0], s.shape[1], gt_pair, seen_mask, candidate_mask,
                               pair_attr, pair_obj, topk)
    return reducer.consume(s).evaluate()


def evaluate_dense(scores, gt_pair, seen_mask, candidate_mask=None, pair_attr=None, pair_obj=None,
                   topk: int = 1) -> EvalResult:
    """:func:`evaluate` by the protocol written out directly: biased copies of the matrix, one
    top-k per bias value. Slower; the reference the streaming path is tested against."""
    s = check_scores(scores)
    inp = validate_inputs(s.shape[0], s.shape[1], gt_pair, seen_mask, candidate_mask,
                          pair_attr, pair_obj, topk)
    return _evaluate_dense(s, inp)


def _evaluate_dense(s: torch.Tensor, inp: _Inputs, threshold: float | None = None) -> EvalResult:
    img_unseen = inp.img_unseen
    n_unseen = int(img_unseen.sum())
    n_seen = len(inp.gt) - n_unseen

    end = _matches(s, inp, MAX_BIAS)
    # gap: k-th best raw score over all seen pairs minus the image's own score (unseen images)
    su = s[img_unseen]
    kth_seen = su[:, inp.seen_mask].topk(inp.topk, dim=1).values[:, -1] if inp.seen_mask.any() \
        else torch.full((len(su),), -math.inf)
    gap = kth_seen - su[torch.arange(len(su)), inp.gt[img_unseen]]
    kept = gap[end[img_unseen]]
    biases = bias_list(kept).tolist() if len(kept) else []

    curve_seen, curve_unseen = [], []
    for b in biases:
        m = _matches(s, inp, b)
        curve_seen.append(_mean(m[~img_unseen]))
        curve_unseen.append(_mean(m[img_unseen]))
    curve_seen.append(_mean(end[~img_unseen]))
    curve_unseen.append(_mean(end[img_unseen]))
    biases.append(MAX_BIAS)

    attr_acc = obj_acc = None
    if inp.pair_attr is not None:
        unbiased = inp.candidate.clone()
        s0 = s.clone()
        s0[:, ~unbiased] = -1e10
        pred = s0.argmax(dim=1)
        attr_acc = _mean(inp.pair_attr[pred] == inp.pair_attr[inp.gt])
        obj_acc = _mean(inp.pair_obj[pred] == inp.pair_obj[inp.gt])
    nan_to = [0.0 if math.isnan(v) else v for v in curve_seen], \
        [0.0 if math.isnan(v) else v for v in curve_unseen]
    return finish(nan_to[0], nan_to[1], biases, attr_acc, obj_acc, inp, n_seen, n_unseen, threshold)


def evaluate_split(scores, split, topk: int = 1) -> EvalResult:
    """:func:`evaluate` with labels and masks taken from a dataset ``Split``."""
    return evaluate(scores, split.labels, split.seen_mask, split.candidate_mask,
                    split.pair_attr, split.pair_obj, topk=topk)
