"""Pair scores of the form ``z^c(x, (i, j)) + prim(p_a(x)_i, p_o(x)_j)`` from an image pass and a
cached text bank, shared by VP-CMJL and CAMS (docs/vpcmjl.md, docs/cams.md).

Both methods' composition logit is linear in one per-image query vector once the image-independent
text side is fixed: VP-CMJL's ``alpha s cos(f, v^c) + beta s cos(f, t^c)`` is ``(s f^) . (alpha v^c^ +
beta t^c^)`` and CAMS's ``beta tau cos(f^g, t^c) + (1 - beta) tau cos(f^c, t^c)`` is ``tau (beta f^g^ +
(1 - beta) f^c^) . t^c^``. So the images are encoded once, the bank once per evaluation, and the
``[N, P]`` scores are one matrix product, tiled into column blocks when ``P`` is large (C-GQA's
open world has 278,362 pairs; the evaluator streams the blocks).

Not a method (no entry point).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from czsl_bench.method import iter_column_blocks

#: Columns per block when the dense ``[N, P]`` matrix would pass this many entries (~0.5 GB fp32).
DENSE_LIMIT = 1 << 27


@dataclass
class ImageSide:
    """What the scores need from the images of a split, in split order."""

    query: Tensor  # [N, D]: composition logits are query @ bank.T
    p_attr: Tensor  # [N, |A|] attribute probabilities
    p_obj: Tensor  # [N, |O|] object probabilities


def combine_primitives(p_attr: Tensor, p_obj: Tensor, how: Literal["sum", "product"]) -> Tensor:
    """The primitive term per pair: ``p_a + p_o`` (VP-CMJL's released score) or ``p_a * p_o``
    (Troika, ClusPro, CAMS); inputs are already gathered per pair column."""
    if how == "sum":
        return p_attr + p_obj
    if how == "product":
        return p_attr * p_obj
    raise ValueError(f"combine must be 'sum' or 'product', got {how!r}")


def pair_scores(side: ImageSide, bank: Tensor, pair_attr: Tensor, pair_obj: Tensor,
                how: Literal["sum", "product"], block: int = 0) -> Tensor | Iterator[tuple[int, Tensor]]:
    """``[N, P]`` float32 CPU scores, or ``(col_start, block)`` tiles when ``block`` > 0 or the
    dense matrix would exceed :data:`DENSE_LIMIT` entries."""
    n, p = side.query.shape[0], bank.shape[0]
    if block <= 0 and n * p <= DENSE_LIMIT:
        return _columns(side, bank, pair_attr, pair_obj, how, 0, p)
    width = block if block > 0 else max(1, DENSE_LIMIT // max(n, 1))
    return _blocks(side, bank, pair_attr, pair_obj, how, width)


def _columns(side: ImageSide, bank: Tensor, pair_attr: Tensor, pair_obj: Tensor, how: str,
             start: int, stop: int) -> Tensor:
    pa, po = pair_attr[start:stop], pair_obj[start:stop]
    comp = side.query @ bank[start:stop].T
    prim = combine_primitives(side.p_attr[:, pa], side.p_obj[:, po], how)
    return (comp + prim).float().cpu()


def _blocks(side: ImageSide, bank: Tensor, pair_attr: Tensor, pair_obj: Tensor, how: str,
            width: int) -> Iterator[tuple[int, Tensor]]:
    for start, stop in iter_column_blocks(bank.shape[0], width):
        yield start, _columns(side, bank, pair_attr, pair_obj, how, start, stop)


def dense(scores: Tensor | Iterator[tuple[int, Tensor]]) -> Tensor:
    """Blocks concatenated back into one matrix (tests, small worlds)."""
    if isinstance(scores, Tensor):
        return scores
    return torch.cat([b for _, b in scores], dim=1)


__all__ = ["ImageSide", "combine_primitives", "pair_scores", "dense", "DENSE_LIMIT"]
