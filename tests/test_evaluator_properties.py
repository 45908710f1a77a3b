"""Invariances of the protocol (hypothesis) and the one-line errors on bad input."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from czsl_bench.evaluation import evaluate, evaluate_dense, evaluate_stream

KEYS = ("best_seen", "best_unseen", "best_hm", "auc", "attr_acc", "obj_acc")

# the literal protocol, evaluate (a dense matrix through the streaming reducer), evaluate_stream
EVERY_PATH = pytest.mark.parametrize("fn", [evaluate_dense, evaluate, evaluate_stream],
                                     ids=["dense", "evaluate", "stream"])


def problem(seed, n=80, p=30):
    g = torch.Generator().manual_seed(seed)
    seen = torch.rand(p, generator=g) < 0.5
    seen[0], seen[1] = True, False
    gt = torch.randint(p, (n,), generator=g)
    s = 20 + 3 * torch.randn(n, p, generator=g)
    s[torch.arange(n), gt] += 4 * torch.rand(n, generator=g)
    return s, gt, seen, torch.arange(p) % 4, torch.arange(p) % 6


def same(a, b, tol=0.0):
    for k in KEYS:
        x, y = getattr(a, k), getattr(b, k)
        assert abs(x - y) <= tol, (k, x, y)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_permuting_images_changes_nothing(seed):
    s, gt, seen, pa, po = problem(seed)
    perm = torch.randperm(len(gt), generator=torch.Generator().manual_seed(seed + 1))
    same(evaluate(s, gt, seen, None, pa, po), evaluate(s[perm], gt[perm], seen, None, pa, po))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_permuting_pairs_changes_nothing_without_ties(seed):
    s, gt, seen, pa, po = problem(seed)
    perm = torch.randperm(s.shape[1], generator=torch.Generator().manual_seed(seed + 2))
    inv = torch.argsort(perm)
    same(evaluate(s, gt, seen, None, pa, po),
         evaluate(s[:, perm], inv[gt], seen[perm], None, pa[perm], po[perm]))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.sampled_from([-8.0, -1.0, 0.5, 3.0, 16.0]))
def test_adding_a_constant_to_every_score_changes_nothing(seed, shift):
    # Gaps between scores are unchanged; the protocol depends on scores only through them
    # (up to float32 rounding, far below the 1e-4 margin for these magnitudes).
    s, gt, seen, pa, po = problem(seed)
    same(evaluate(s, gt, seen, None, pa, po), evaluate(s + shift, gt, seen, None, pa, po), tol=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.sampled_from([0.25, 0.5, 2.0, 4.0]))
def test_positive_scaling_changes_nothing_at_logit_scale(seed, scale):
    # The bias list scales with the scores; only the fixed 1e-4 margin does not, which moves
    # no image unless two gaps are within 1e-4 of each other.
    s, gt, seen, pa, po = problem(seed)
    same(evaluate(s, gt, seen, None, pa, po), evaluate(s * scale, gt, seen, None, pa, po), tol=1e-9)


def test_result_fields_are_fractions():
    s, gt, seen, pa, po = problem(3)
    r = evaluate(s, gt, seen, None, pa, po)
    for k in KEYS + ("hm_seen", "hm_unseen"):
        assert 0.0 <= getattr(r, k) <= 1.0
    assert 0.0 < r.auc <= 1.0
    assert r.curve_unseen == sorted(r.curve_unseen)  # unseen accuracy grows with the bias


# ---- bad input: a ValueError naming the argument --------------------------------------------
S = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
GT = torch.tensor([0, 1])
SEEN = torch.tensor([True, False])


@EVERY_PATH
@pytest.mark.parametrize("kwargs, match", [
    (dict(gt_pair=torch.tensor([0, 1, 1])), "has shape"),
    (dict(gt_pair=torch.tensor([0, 2])), r"gt_pair\[1\] = 2 is out of range"),
    (dict(gt_pair=torch.tensor([0, -1])), "out of range"),
    (dict(gt_pair=torch.tensor([0.0, 1.0])), "integer"),
    (dict(seen_mask=torch.tensor([True])), "seen_mask has shape"),
    (dict(candidate_mask=torch.tensor([True, False])), "not a candidate"),
    (dict(candidate_mask=torch.tensor([0.5, 1.0])), "candidate_mask must be boolean"),
    (dict(pair_attr=torch.tensor([0, 1])), "pass both pair_attr and pair_obj"),
    (dict(topk=0), "topk must be a positive integer"),
    (dict(topk=3), "exceeds the 2 candidate"),
])
def test_bad_arguments(fn, kwargs, match):
    args = dict(gt_pair=GT, seen_mask=SEEN)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fn(S, **args)


@EVERY_PATH
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores(fn, bad):
    s = S.clone()
    s[1, 0] = bad
    with pytest.raises(ValueError, match=r"NaN/inf value\(s\), first at image 1, pair 0"):
        fn(s, GT, SEEN)


def test_dense_shape_and_empty_split():
    with pytest.raises(ValueError, match="2-D"):
        evaluate(torch.zeros(3), GT, SEEN)
    with pytest.raises(ValueError, match="split is empty"):
        evaluate(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), SEEN)


def test_stream_blocks_must_cover_columns_in_order():
    with pytest.raises(ValueError, match="expected a block at column 0"):
        evaluate_stream([(1, S[:, 1:])], GT, SEEN)
    with pytest.raises(ValueError, match="covered 1 of 2"):
        evaluate_stream([(0, S[:, :1])], GT, SEEN)
    with pytest.raises(ValueError, match="one row per image"):
        evaluate_stream([(0, S[:1])], GT, SEEN)
