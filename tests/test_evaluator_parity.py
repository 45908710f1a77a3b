"""The evaluator against an independent restatement of the published protocol, and dense
against streaming (exactly, ties included)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from czsl_bench.evaluation import evaluate, evaluate_dense, evaluate_stream
from czsl_bench.evaluation.feasibility import (compute_feasibility, evaluate_open_world,
                                               mask_scores, open_world, threshold_grid)
from czsl_bench.evaluation.metrics import _evaluate_dense, validate_inputs

from reference_protocol import reference_evaluate, reference_open_world

KEYS = ("best_seen", "best_unseen", "best_hm", "auc", "attr_acc", "obj_acc")


def clip_like_problem(seed, n=300, n_attr=8, n_obj=9, seen_frac=0.5, signal=2.0, open_world=False):
    """Random CZSL-shaped scores: logits around 20 with a boost on each image's own pair."""
    g = torch.Generator().manual_seed(seed)
    p = n_attr * n_obj
    pair_attr = torch.arange(p) // n_obj
    pair_obj = torch.arange(p) % n_obj
    seen = torch.rand(p, generator=g) < seen_frac
    split_pairs = torch.rand(p, generator=g) < 0.5
    cand = seen | split_pairs if not open_world else torch.ones(p, dtype=torch.bool)
    cand_idx = cand.nonzero().flatten()
    gt = cand_idx[torch.randint(len(cand_idx), (n,), generator=g)]
    scores = 20 + 2 * torch.randn(n, p, generator=g)
    scores[torch.arange(n), gt] += signal * torch.rand(n, generator=g) * 3
    # the usual seen bias of trained models
    scores[:, seen] += 1.0
    return scores, gt, seen, cand, pair_attr, pair_obj


@pytest.mark.parametrize("fn", [evaluate_dense, evaluate], ids=["dense", "evaluate"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("topk", [1, 3])
def test_matches_reference_protocol(fn, seed, topk):
    s, gt, seen, cand, pa, po = clip_like_problem(seed)
    ref = reference_evaluate(s, gt, seen, cand, pa, po, topk=topk)
    r = fn(s, gt, seen, cand, pa, po, topk=topk)
    for k in ("best_seen", "best_unseen", "best_hm", "auc") + (("attr_acc", "obj_acc") if topk == 1 else ()):
        assert getattr(r, k) == pytest.approx(ref[k], abs=1e-6), k
    assert r.bias == pytest.approx(ref["bias"], abs=1e-6)
    assert len(r.curve_seen) == (len(r.biases))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 60), topk=st.integers(1, 3),
       grid=st.sampled_from([1.0, 0.5, None]))
def test_dense_equals_stream_exactly_ties_included(seed, n, topk, grid):
    g = torch.Generator().manual_seed(seed)
    p = 24
    s = torch.randn(n, p, generator=g) * 2
    if grid is not None:  # integer or half-integer scores: exact ties everywhere
        s = torch.round(s / grid) * grid
    seen = torch.rand(p, generator=g) < 0.5
    seen[0], seen[1] = True, False
    cand = (torch.rand(p, generator=g) < 0.7) | seen
    cand[1] = True
    ci = cand.nonzero().flatten()
    gt = ci[torch.randint(len(ci), (n,), generator=g)]
    pa, po = torch.arange(p) % 5, torch.arange(p) % 7
    if topk > int(cand.sum()):
        return
    d = evaluate_dense(s, gt, seen, cand, pa, po, topk=topk)
    results = {"evaluate": evaluate(s, gt, seen, cand, pa, po, topk=topk)}
    for margin, block in ((16, 5), (0, 3), (1, 100)):
        def blocks(block=block):
            for c0 in range(0, p, block):
                yield c0, s[:, c0:c0 + block]
        results[f"margin {margin}"] = evaluate_stream(blocks, gt, seen, cand, pa, po, topk=topk, margin=margin)
    for name, r in results.items():
        for k in KEYS + ("hm_seen", "hm_unseen", "bias"):
            a, b = getattr(d, k), getattr(r, k)
            assert (a == b) or (a != a and b != b), (k, a, b, name)
        assert d.curve_seen == r.curve_seen and d.curve_unseen == r.curve_unseen, name


def test_one_shot_iterator_with_unresolvable_ties_is_refused():
    s = torch.zeros(4, 10)  # every score ties
    gt = torch.tensor([0, 1, 2, 3])
    seen = torch.tensor([True] * 5 + [False] * 5)
    gen = ((c0, s[:, c0:c0 + 2]) for c0 in range(0, 10, 2))
    with pytest.raises(ValueError, match="near-ties"):
        evaluate_stream(gen, gt, seen, margin=0)


def test_feasibility_golden():
    # attrs a0=[1,0], a1=[.6,.8] (cos .6); objs o0=[1,0,0], o1=[.8,.6,0], o2=[0,0,1]
    # seen (a0,o0), (a1,o1), (a0,o2). (a0,o1): obj part max(cos(o1,o0)=.8, cos(o1,o2)=0) = .8,
    # attr part cos(a0,a1) = .6 -> .7; (a1,o0): .8 and .6 -> .7; (a1,o2): obj part cos(o2,o1)=0,
    # attr part .6 -> .3; seen pairs 0.
    ea = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    eo = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
    f = compute_feasibility(ea, eo, [(0, 0), (1, 1), (0, 2)])
    assert f.tolist() == pytest.approx([0.0, 0.7, 0.0, 0.7, 0.0, 0.3], abs=1e-6)
    # an attribute with no seen pair: obj part is -1
    ea3 = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    f3 = compute_feasibility(ea3, eo, [(0, 0), (1, 1), (0, 2)])
    assert f3[2 * 3 + 2].item() == pytest.approx((-1 + 0.0) / 2)  # (a2,o2): attr part cos(a2,a0)=0


def test_masking_doubles_seen_for_nonpositive_thresholds():
    s = torch.tensor([[2.0, 3.0, 4.0]])
    feas = torch.tensor([0.0, 0.5, -0.2])
    seen = torch.tensor([True, False, False])
    assert mask_scores(s, feas, seen, 0.1).tolist() == [[2.0, 3.0, 0.0]]
    assert mask_scores(s, feas, seen, -0.5).tolist() == [[4.0, 3.0, 4.0]]


@pytest.mark.parametrize("seed", range(2))
def test_open_world_matches_reference_pipeline(seed):
    # Masked pairs all score 0, an exact tie: use >= 100 pairs, where torch.topk (the oracle's
    # tie order) also picks the lowest index on CPU.
    n_attr, n_obj = 10, 12
    s_val, gt_val, seen, _, pa, po = clip_like_problem(seed, n=100, n_attr=n_attr, n_obj=n_obj,
                                                       open_world=True)
    s_test, gt_test, _, _, _, _ = clip_like_problem(seed + 100, n=110, n_attr=n_attr, n_obj=n_obj,
                                                    open_world=True)
    # same seen mask for both splits
    g = torch.Generator().manual_seed(seed)
    emb_a, emb_o = torch.randn(n_attr, 6, generator=g), torch.randn(n_obj, 6, generator=g)
    seen_pairs = [(int(i) // n_obj, int(i) % n_obj) for i in seen.nonzero().flatten()]
    feas = compute_feasibility(emb_a, emb_o, seen_pairs)
    # infeasible-looking pairs score lower, as they would for a model with priors
    s_val = s_val + 2 * feas
    s_test = s_test + 2 * feas
    ref_th, ref_test = reference_open_world(s_val, gt_val, s_test, gt_test, seen, feas, pa, po)
    out = open_world(s_val, gt_val, s_test, gt_test, seen, feas, pa, po)
    assert out.threshold == pytest.approx(ref_th, abs=1e-9)
    for k in KEYS:
        assert getattr(out.test, k) == pytest.approx(ref_test[k], abs=1e-6), k
    assert len(out.val_auc) == 50
    # the dense path on the masked matrix agrees exactly with the streamed open-world result
    allc = torch.ones(len(seen), dtype=torch.bool)
    dense = evaluate(mask_scores(s_test, feas, seen, out.threshold), gt_test, seen, allc, pa, po)
    for k in KEYS:
        assert getattr(dense, k) == getattr(out.test, k), k


def test_every_threshold_of_the_search_equals_dense_masking():
    s, gt, seen, _, pa, po = clip_like_problem(7, n=150, open_world=True)
    feas = torch.rand(len(seen), generator=torch.Generator().manual_seed(1)) * seen.logical_not()
    out = open_world(s, gt, s, gt, seen, feas, pa, po)
    grid = threshold_grid(feas, seen)
    allc = torch.ones(len(seen), dtype=torch.bool)
    for j in (0, 10, 25, 49):
        d = evaluate(mask_scores(s, feas, seen, grid[j]), gt, seen, allc, pa, po)
        assert d.auc == pytest.approx(out.val_auc[j], abs=0)


@pytest.mark.parametrize("dataset, n_pairs, n_seen, index, csp_threshold", [
    ("mit-states", 28175, 1262, 29, 0.4069159426),
    ("ut-zappos", 192, 83, 18, 0.5299109123),
    ("cgqa", 278362, 5592, 34, 0.49937106273612186),
])
def test_reference_feasibility_reproduces_csp_thresholds(dataset, n_pairs, n_seen, index, csp_threshold):
    feas = __import__("czsl_bench.evaluation.feasibility", fromlist=["x"]).reference_feasibility(dataset)
    assert feas.shape == (n_pairs,)
    seen = feas == 0  # the files store 0 for exactly the training pairs
    assert int(seen.sum()) == n_seen
    grid = threshold_grid(feas, seen)
    assert len(grid) == 50
    assert abs(grid[index] - csp_threshold) < 3e-6
