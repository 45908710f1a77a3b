"""A literal, unoptimised restatement of the published protocol, used only as a test oracle.

Written from the protocol description (docs/evaluation.md), step by step in the shape of the
original evaluator: a biased copy of the full matrix per bias value, ``torch.topk`` for the
predictions, float32 means, ``np.trapezoid`` for the AUC. It is deliberately independent of
czsl_bench.evaluation's code, so agreement between the two is evidence, not tautology. Like the
original, its tie order is torch.topk's, so compare on tie-free score matrices only.
"""

from __future__ import annotations

import numpy as np
import torch


def _hmean(a: float, b: float) -> float:
    try:
        if a <= 0 or b <= 0:
            return 0.0
        return 2 / (1 / a + 1 / b)
    except ZeroDivisionError:
        return 0.0


def reference_evaluate(scores, gt, seen_mask, candidate_mask, pair_attr, pair_obj, topk=1):
    scores = torch.as_tensor(scores, dtype=torch.float32)
    n, p = scores.shape
    gt = torch.as_tensor(gt)
    seen_mask = torch.as_tensor(seen_mask, dtype=torch.bool)
    candidate_mask = torch.as_tensor(candidate_mask, dtype=torch.bool)

    def predict(bias):
        s = scores.clone()
        s[:, ~seen_mask] += torch.tensor(bias, dtype=torch.float32)
        s[:, ~candidate_mask] = -1e10
        return s.topk(topk, dim=1).indices

    def match(pred):
        return (pred == gt[:, None]).any(1)

    img_unseen = ~seen_mask[gt]
    closed = match(predict(1e3))
    seen_max = closed[~img_unseen].float().mean().item()
    unseen_max = closed[img_unseen].float().mean().item()

    su = scores[img_unseen]
    kth = su[:, seen_mask].topk(topk, dim=1)[0][:, topk - 1]
    gap = kth - su[torch.arange(len(su)), gt[img_unseen]]
    gap = gap[closed[img_unseen]] - 1e-4
    gap = torch.sort(gap)[0]
    step = max(len(gap) // 20, 1)
    biaslist = gap[::step]

    seen_acc, unseen_acc = [], []
    for b in biaslist:
        m = match(predict(float(b)))
        seen_acc.append(m[~img_unseen].float().mean().item())
        unseen_acc.append(m[img_unseen].float().mean().item())
    seen_acc.append(seen_max)
    unseen_acc.append(unseen_max)
    seen_acc, unseen_acc = np.array(seen_acc), np.array(unseen_acc)
    hms = np.array([_hmean(s, u) for s, u in zip(seen_acc, unseen_acc)])
    j = int(np.argmax(hms))
    pred0 = predict(0.0)[:, 0]
    return {
        "best_seen": float(seen_acc.max()), "best_unseen": float(unseen_acc.max()),
        "best_hm": float(hms[j]), "auc": float(np.trapezoid(seen_acc, unseen_acc)),
        "attr_acc": (torch.as_tensor(pair_attr)[pred0] == torch.as_tensor(pair_attr)[gt]).float().mean().item(),
        "obj_acc": (torch.as_tensor(pair_obj)[pred0] == torch.as_tensor(pair_obj)[gt]).float().mean().item(),
        "bias": float(biaslist[j]) if j < len(biaslist) else 1e3,
    }


def reference_open_world(val_scores, val_gt, test_scores, test_gt, seen_mask, feasibility,
                         pair_attr, pair_obj, n_thresholds=50):
    feas = torch.as_tensor(feasibility, dtype=torch.float32)
    seen = torch.as_tensor(seen_mask, dtype=torch.bool)
    lo = (feas + 10 * seen.float()).min().item()
    hi = (feas - 10 * seen.float()).max().item()
    allc = torch.ones(len(seen), dtype=torch.bool)

    def masked(s, th):
        return s * ((feas >= th).float() + seen.float())

    best_auc, best_th = 0.0, -10.0
    for th in np.linspace(lo, hi, num=n_thresholds):
        r = reference_evaluate(masked(val_scores, th), val_gt, seen, allc, pair_attr, pair_obj)
        if r["auc"] > best_auc:
            best_auc, best_th = r["auc"], th
    test = reference_evaluate(masked(test_scores, best_th), test_gt, seen, allc, pair_attr, pair_obj)
    return float(best_th), test
