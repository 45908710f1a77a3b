"""Explanations of the three-path methods (Troika, ClusPro and its base) for ``czsl-bench explain``.

Not a method (no entry point). A three-path score is ``s_c + p_a * p_o``: the composition
branch's scaled cosine plus the product of the attribute and object branches' softmax
probabilities (three_path.py ``combine``), so those two terms are the contributions, and they sum
to the score. ClusPro additionally reports, from its training state, the prototypes nearest to
the image's stage-1 primitive features: the prototypes are kept in the method's state (and so in
its checkpoint) for this; scoring never reads them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def three_path_explanation(method: Any, ctx: Any, split: Any, index: int, top: int = 5,
                           memories: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Top pairs of image ``index`` with ``s_c`` and ``p_a * p_o`` per pair; with ``memories``
    (ClusPro's attribute and object prototype memories) the nearest prototypes too."""
    from czsl_bench.datasets.czsl_format import decode_image

    model = method.model
    model.eval()
    image = ctx.backbone.preprocess_eval(decode_image(split.image_path(index)))[None].to(ctx.device)
    pair_attr, pair_obj = split.pair_attr.to(ctx.device), split.pair_obj.to(ctx.device)
    text = method.pair_text_features(pair_attr, pair_obj, key=(split.name, split.world, len(split.pairs)))
    feats = model.image_features(image)
    s_c, s_a, s_o = model.branch_logits(feats, text)
    p_a, p_o = s_a.softmax(-1)[0], s_o.softmax(-1)[0]
    score = model.combine(s_c, s_a, s_o, pair_attr, pair_obj)[0].float().cpu()
    ranked = torch.where(split.candidate_mask.bool(), score, torch.full_like(score, -math.inf)).argsort(descending=True)
    gt = int(split.labels[index])
    attrs, objs = list(ctx.dataset.attrs), list(ctx.dataset.objs)
    entries = []
    for j in ranked[:max(1, top)].tolist():
        a, o = int(pair_attr[j]), int(pair_obj[j])
        prim = float(p_a[a] * p_o[o])
        entries.append({
            "pair": " ".join(split.pairs[j]), "score": float(score[j]), "seen": bool(split.seen_mask[j]),
            "contributions": [
                {"text": "composition branch (scale x cosine)", "group": "pair", "contribution": float(s_c[0, j])},
                {"text": f"p({attrs[a]}) x p({objs[o]}) = {float(p_a[a]):.3f} x {float(p_o[o]):.3f}",
                 "group": "attr x obj", "contribution": prim},
            ],
            "attr": {"name": attrs[a], "logit": float(s_a[0, a]), "prob": float(p_a[a]),
                     "rank": int((s_a[0] > s_a[0, a]).sum()) + 1},
            "obj": {"name": objs[o], "logit": float(s_o[0, o]), "prob": float(p_o[o]),
                    "rank": int((s_o[0] > s_o[0, o]).sum()) + 1},
        })
    out = {
        "method": method.name, "image": split.images[index], "index": int(index), "split": split.name,
        "world": split.world, "true_pair": " ".join(split.pairs[gt]), "true_seen": bool(split.seen_mask[gt]),
        "true_rank": int((ranked == gt).nonzero()[0, 0]) + 1,
        "ranking": "by raw score among the split's candidate pairs (no unseen bias)",
        "decomposition": "score = composition branch + p(attr) x p(obj)", "top": entries,
    }
    if memories is not None and memories[0] is not None:
        out["prototypes"] = {
            "attr": nearest_prototypes(memories[0], feats.attr_stage1[0], attrs, int(split.attr_labels[index]),
                                       int(pair_attr[ranked[0]])),
            "obj": nearest_prototypes(memories[1], feats.obj_stage1[0], objs, int(split.obj_labels[index]),
                                      int(pair_obj[ranked[0]])),
            "note": "prototypes of the training state (stage-1 features); inference does not use them",
        }
    return out


def nearest_prototypes(memory: Any, feature: Tensor, names: list[str], true: int, predicted: int,
                       k: int = 3) -> dict[str, Any]:
    """Cosines of one stage-1 feature to a prototype memory: the ``k`` nearest prototypes over
    all primitives, and every prototype of the true and of the predicted primitive."""
    protos = F.normalize(memory.prototypes.float(), dim=-1)  # [C, K, D]
    cos = torch.einsum("ckd,d->ck", protos, F.normalize(feature.float(), dim=-1)).cpu()
    seeded = memory.initialized.cpu()
    if not seeded.any():  # the code variant never marks seeding: its unseeded prototypes are zero
        seeded = memory.prototypes.norm(dim=-1).gt(0).any(-1).cpu()
    # a prototype never seeded by a training sample is noise, not a cluster: leave it out
    masked = torch.where(seeded[:, None], cos, torch.full_like(cos, -math.inf))
    flat = masked.flatten().argsort(descending=True)[:k]
    width = cos.shape[1]
    return {
        "nearest": [{"primitive": names[int(i) // width], "prototype": int(i) % width, "cosine": float(masked.flatten()[i])}
                    for i in flat if math.isfinite(float(masked.flatten()[i]))],
        "true": {"primitive": names[true], "cosines": [float(c) for c in cos[true]], "seeded": bool(seeded[true])},
        "predicted": {"primitive": names[predicted], "cosines": [float(c) for c in cos[predicted]],
                      "seeded": bool(seeded[predicted])},
    }
