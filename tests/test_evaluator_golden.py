"""Hand-computed golden values for the protocol (the derivations are in the comments)."""

import math

import pytest
import torch

from czsl_bench.evaluation import PROTOCOL_VERSION, evaluate, evaluate_dense, evaluate_stream

# pairs: p0, p1 seen; p2 unseen. Images 0,1 seen (gt p0, p1); images 2,3 unseen (gt p2).
SCORES = torch.tensor([[5.0, 3.0, 4.0],
                       [2.0, 6.0, 1.0],
                       [3.0, 1.0, 2.5],
                       [1.0, 2.0, 4.0]])
GT = torch.tensor([0, 1, 2, 2])
SEEN = torch.tensor([True, True, False])
PAIR_ATTR = torch.tensor([0, 1, 0])
PAIR_OBJ = torch.tensor([0, 0, 1])

# the literal protocol, evaluate (a dense matrix through the streaming reducer), evaluate_stream
EVERY_PATH = pytest.mark.parametrize("fn", [evaluate_dense, evaluate, evaluate_stream],
                                     ids=["dense", "evaluate", "stream"])


@EVERY_PATH
def test_closed_world_top1(fn):
    # b=1e3: every image predicts p2 -> seen 0/2, unseen 2/2.
    # gaps (best seen - own): image 2: 3-2.5=0.5, image 3: 2-4=-2 -> biases -2.0001, 0.4999
    # b=-2.0001: seen 2/2, unseen 0/2;  b=0.4999: seen 2/2, unseen 1/2 (image 3)
    # curve (1,0) (1,.5) (0,1): AUC = .5*(1+1)/2 + .5*(1+0)/2 = .75; HM max = 2/3 at b=.4999
    # unbiased top-1: p0, p1, p0, p2 -> attr 4/4, obj 3/4
    r = fn(SCORES, GT, SEEN, None, PAIR_ATTR, PAIR_OBJ)
    assert r.curve_seen == [1.0, 1.0, 0.0]
    assert r.curve_unseen == [0.0, 0.5, 1.0]
    assert r.auc == pytest.approx(0.75, abs=1e-12)
    assert r.best_seen == 1.0 and r.best_unseen == 1.0
    assert r.best_hm == pytest.approx(2 / 3, abs=1e-12)
    assert (r.hm_seen, r.hm_unseen) == (1.0, 0.5)
    assert r.bias == pytest.approx(0.4999, abs=1e-6)
    assert r.attr_acc == 1.0 and r.obj_acc == 0.75
    assert r.protocol == PROTOCOL_VERSION
    assert (r.n_seen_images, r.n_unseen_images) == (2, 2)


@EVERY_PATH
def test_closed_world_top2(fn):
    # 2nd-best seen score: image 2 -> 1, gap -1.5; image 3 -> 1, gap -3 -> biases -3.0001, -1.5001
    # b=-3.0001: seen 2/2 (p0,p1 top-2), unseen 0/2; b=-1.5001: unseen 1/2 (image 3); end: 1, 1
    # curve (1,0) (1,.5) (1,1): AUC = 1; best HM = 1 at the end point (bias 1e3)
    r = fn(SCORES, GT, SEEN, None, PAIR_ATTR, PAIR_OBJ, topk=2)
    assert r.curve_seen == [1.0, 1.0, 1.0]
    assert r.curve_unseen == [0.0, 0.5, 1.0]
    assert r.auc == pytest.approx(1.0)
    assert r.best_hm == 1.0 and r.bias == 1e3


@EVERY_PATH
def test_candidate_mask_removes_pairs(fn):
    # Without p1 as a candidate, image 1 (gt p1) would be invalid; use a 4th pair instead.
    scores = torch.tensor([[5.0, 3.0, 4.0, 9.0],
                           [3.0, 1.0, 2.5, 9.0]])
    gt = torch.tensor([0, 2])
    seen = torch.tensor([True, True, False, False])
    cand = torch.tensor([True, True, True, False])  # p3 (score 9) is not a candidate
    # b=1e3: image 0 -> p2 (wrong), image 1 -> p2 (right). gap image 1: 3 - 2.5 = .5 -> b = .4999
    # b=.4999: image 0: 5 > 4.4999 right; image 1: 3 > 2.9999 -> p0, wrong. curve (1,0) (0,1)
    r = fn(scores, gt, seen, cand)
    assert r.curve_seen == [1.0, 0.0] and r.curve_unseen == [0.0, 1.0]
    assert r.auc == pytest.approx(0.5)
    assert r.best_hm == 0.0  # no point has both accuracies > 0
    assert r.attr_acc is None and r.n_candidates == 3


@EVERY_PATH
def test_no_unseen_image_ever_correct(fn):
    # The unseen image's pair is never predicted even at b=1e3 (another unseen pair wins):
    # the curve is the single end point, so best_seen = 0 and AUC = 0 (the official behaviour).
    scores = torch.tensor([[9.0, 1.0, 2.0], [1.0, 2.0, 8.0]])
    gt = torch.tensor([0, 1])
    seen = torch.tensor([True, False, False])
    r = fn(scores, gt, seen)
    assert r.curve_seen == [0.0] and r.curve_unseen == [0.0]
    assert r.best_seen == 0.0 and r.auc == 0.0 and r.best_hm == 0.0


@EVERY_PATH
def test_only_seen_images_reports_undefined_not_zero(fn):
    scores = torch.tensor([[5.0, 1.0], [1.0, 5.0]])
    r = fn(scores, torch.tensor([0, 1]), torch.tensor([True, True]))
    assert r.best_seen == 1.0
    assert math.isnan(r.best_unseen) and math.isnan(r.auc) and math.isnan(r.best_hm)
    assert any("no unseen image" in w for w in r.warnings)


@EVERY_PATH
def test_one_image(fn):
    r = fn(torch.tensor([[1.0, 3.0]]), torch.tensor([1]), torch.tensor([True, False]))
    # one unseen image: gap = 1 - 3 = -2 -> b = -2.0001, just before it flips (3 - 2.0001 < 1)
    assert r.curve_unseen == [0.0, 1.0]
    assert math.isnan(r.best_seen) and r.best_unseen == 1.0


@EVERY_PATH
def test_ties_lowest_pair_index_wins(fn):
    # Both images tie between p0 and p1 (both seen) at every bias: the lower index (p0) wins.
    scores = torch.tensor([[2.0, 2.0, 0.0], [2.0, 2.0, 0.0], [0.0, 1.0, 5.0]])
    gt = torch.tensor([0, 1, 2])
    seen = torch.tensor([True, True, False])
    r = fn(scores, gt, seen, None, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]))
    assert r.attr_acc == pytest.approx(2 / 3)  # image 0 right (p0), image 1 wrong (p0 != p1)
    assert r.best_seen == 0.5
