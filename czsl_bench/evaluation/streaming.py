"""Streaming evaluation: the same protocol without ever holding the ``[images, pairs]`` matrix.

Scores arrive as column blocks ``(col_start, [N, b] tensor)`` in increasing column order. One
pass keeps, per image, only the top ``k + margin`` candidate scores of each column group, the
image's own score and (for the protocol's gap) the best seen scores; every bias point of the
curve is then an O(N * (k + margin)) merge. Column groups are (seen?, candidate?, feasibility
bin): binning pairs by the open-world threshold grid makes all 50 thresholds of the validation
search answerable from one pass, never rescoring an image.

Exactness. The dense protocol adds the bias in float32, which can merge two close unseen
scores into an exact tie (broken by the lowest pair index). The reducer knows, for every image,
the largest score it did *not* keep; when that score could tie with the k-th prediction at some
bias, the image is flagged, and its full row is re-read from the source (when the source is
re-iterable: a callable or a tensor) and evaluated densely. So the streaming result equals the
dense one exactly, also on tie-heavy scores.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Union

import numpy as np
import torch

from .metrics import (MAX_BIAS, EvalResult, _Inputs, _matches, _mean, bias_list, check_finite,
                      finish, real_values, validate_inputs, vector_length)

Blocks = Iterable[tuple[int, torch.Tensor]]
BlockSource = Union[torch.Tensor, Callable[[], Blocks], Blocks]

_NEG = -math.inf
_NO_INDEX = torch.iinfo(torch.int64).max


def dense_blocks(scores: torch.Tensor, block_size: int = 8192) -> Callable[[], Iterator[tuple[int, torch.Tensor]]]:
    """A re-iterable block source over a dense matrix."""

    def gen():
        for c0 in range(0, scores.shape[1], block_size):
            yield c0, scores[:, c0:c0 + block_size]

    return gen


def _iterate(source: BlockSource) -> Iterable[tuple[int, torch.Tensor]]:
    if isinstance(source, torch.Tensor):
        return dense_blocks(source)()
    if callable(source):
        return source()
    return source


def _reiterable(source: BlockSource) -> bool:
    return isinstance(source, torch.Tensor) or callable(source)


def _sort_by_key(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort rows by (value descending, index ascending)."""
    order = torch.argsort(idx, dim=1, stable=True)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = torch.argsort(vals, dim=1, descending=True, stable=True)
    return vals.gather(1, order), idx.gather(1, order)


def _top_by_key(vals: torch.Tensor, idx: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``cap`` entries per row under (value desc, index asc), sorted.

    ``idx`` may be a 1-D column-index vector shared by every row (a block) or ``[N, W]``.
    """
    width = vals.shape[1]
    shared = idx.dim() == 1
    if width <= cap + 8:
        full_idx = idx.expand(vals.shape[0], -1) if shared else idx
        v, i = _sort_by_key(vals, full_idx)
        return v[:, :cap], i[:, :cap]
    fetch = cap + 8
    top_v, top_pos = vals.topk(fetch, dim=1)
    top_i = idx[top_pos] if shared else idx.gather(1, top_pos)
    # If the cap-th value equals the last fetched value, tied entries with lower indices may
    # have been left behind by topk: sort those rows in full.
    ambiguous = top_v[:, cap - 1] == top_v[:, -1]
    v, i = _sort_by_key(top_v, top_i)
    v, i = v[:, :cap], i[:, :cap]
    if ambiguous.any():
        v, i = v.clone(), i.clone()
        rows = ambiguous.nonzero().flatten()
        a_idx = idx.expand(len(rows), -1) if shared else idx[rows]
        av, ai = _sort_by_key(vals[rows], a_idx)
        v[rows], i[rows] = av[:, :cap], ai[:, :cap]
    return v, i


@dataclass
class _Group:
    cols: torch.Tensor  # sorted column indices of this group
    seen: bool
    candidate: bool
    bin: int  # number of grid thresholds <= the pairs' feasibility
    vals: torch.Tensor  # [N, cap] kept scores, sorted by key
    idx: torch.Tensor  # [N, cap]


class StreamingReducer:
    """One pass over column blocks; then metrics at any threshold of the grid.

    Args:
        n_images, gt_pair, seen_mask, candidate_mask, pair_attr, pair_obj, topk: as ``evaluate``.
        feasibility: ``[P]`` feasibility scores; with ``thresholds`` enables CSP-style masking
            ``S * (1[feas >= th] + seen)`` at evaluation time.
        thresholds: ascending grid of feasibility thresholds the caller will ask about.
        margin: extra scores kept per group beyond ``topk`` (only affects speed: images whose
            kept scores cannot decide the ranking are re-read from the source).
        track_all_feasible: keep what ``evaluate(-1)`` (every pair feasible) needs; a caller
            that only asks about grid thresholds can skip the pairs below the lowest one.
    """

    def __init__(self, n_images: int, n_pairs: int, gt_pair, seen_mask, candidate_mask=None,
                 pair_attr=None, pair_obj=None, topk: int = 1, feasibility=None,
                 thresholds=None, margin: int = 4, track_all_feasible: bool = True):
        self.inp: _Inputs = validate_inputs(n_images, n_pairs, gt_pair, seen_mask, candidate_mask,
                                            pair_attr, pair_obj, topk)
        self.n_images, self.n_pairs = n_images, n_pairs
        self.cap = topk + margin + 1  # the last kept entry is the "largest not used" sentinel
        self.masking = feasibility is not None
        self.track_all_feasible = track_all_feasible
        if self.masking:
            feas = real_values(feasibility, "feasibility").detach().to("cpu", torch.float32)
            if feas.shape != (n_pairs,):
                raise ValueError(f"feasibility has shape {tuple(feas.shape)} but there are {n_pairs} "
                                 "pairs; pass one score per pair (open-world pair order)")
            check_finite(feas[None], "feasibility")
            th = torch.as_tensor(np.asarray(thresholds if thresholds is not None else [], dtype=np.float64))
            self.thresholds = th.tolist()
            th32 = th.float()
            if len(th32) > 1 and not bool((th32[1:] >= th32[:-1]).all()):
                raise ValueError("thresholds must be in ascending order")
            self.feas = feas
            self.pair_bin = torch.searchsorted(th32, feas, right=True)  # thresholds <= feas
        else:
            self.thresholds = []
            self.feas = None
            self.pair_bin = torch.zeros(n_pairs, dtype=torch.long)
        self.gt_score = torch.full((n_images,), float("nan"))
        self.groups: list[_Group] = []
        seen, cand = self.inp.seen_mask, self.inp.candidate
        for is_seen in (True, False):
            for is_cand in (True, False):
                if not is_cand and not is_seen:
                    continue  # unseen non-candidates never matter
                sel = (seen == is_seen) & (cand == is_cand)
                for b in torch.unique(self.pair_bin[sel]).tolist():
                    if self.masking and not is_seen and b == 0 and not track_all_feasible:
                        continue  # infeasible at every grid threshold: masked to 0, never ranked
                    cols = (sel & (self.pair_bin == b)).nonzero().flatten()
                    # seen scores get no bias, so their top-k is exact: no margin needed
                    cap = topk + 1 if is_seen else self.cap
                    self.groups.append(_Group(
                        cols, is_seen, is_cand, int(b),
                        torch.full((n_images, cap), _NEG),
                        torch.full((n_images, cap), _NO_INDEX, dtype=torch.long)))
        self._next_col = 0
        self.source: BlockSource | None = None
        self._pending: list[torch.Tensor] = []
        self._pending_cols = 0
        # buffer about 256 MB of scores before reducing (at least 2048 columns)
        self._buffer_cols = max(2048, (64 << 20) // max(n_images, 1))

    # -- the pass ------------------------------------------------------------------------------
    def update(self, col_start: int, block: torch.Tensor) -> None:
        block = real_values(block, f"the scores (block at column {col_start})")
        if block.dim() != 2 or block.shape[0] != self.n_images:
            raise ValueError(f"score block at column {col_start} has shape {tuple(block.shape)}; "
                             f"expected [{self.n_images}, b] (one row per image)")
        if col_start != self._next_col:
            raise ValueError(f"score blocks must cover the pair columns in order without gaps: "
                             f"expected a block at column {self._next_col}, got {col_start}")
        width = block.shape[1]
        if col_start + width > self.n_pairs:
            raise ValueError(f"score block [{col_start}, {col_start + width}) runs past the "
                             f"{self.n_pairs} pairs")
        block = block.detach().to("cpu", torch.float32)
        if not torch.isfinite(block.sum()):  # one cheap pass; locate the culprit only if needed
            check_finite(block, "scores", col_offset=col_start)
        end = col_start + width
        gt = self.inp.gt
        rows = ((gt >= col_start) & (gt < end)).nonzero().flatten()
        if len(rows):
            self.gt_score[rows] = block[rows, gt[rows] - col_start]
        self._pending.append(block)
        self._pending_cols += width
        self._next_col = end
        if self._pending_cols >= self._buffer_cols or end == self.n_pairs:
            self._flush()

    def _flush(self) -> None:
        """Reduce the buffered blocks: few wide blocks cost far less per-call overhead than
        many narrow ones (the caller's block size is the method's choice, not ours)."""
        if not self._pending:
            return
        block = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending, dim=1)
        end = self._next_col
        col_start = end - block.shape[1]
        width = block.shape[1]
        self._pending, self._pending_cols = [], 0
        for g in self.groups:
            lo, hi = torch.searchsorted(g.cols, torch.tensor([col_start, end])).tolist()
            if lo == hi:
                continue
            cols = g.cols[lo:hi]
            if hi - lo == width:  # the whole block belongs to this group: no copy
                sub = block
            elif int(cols[-1] - cols[0]) == hi - lo - 1:  # a contiguous run: a view
                sub = block[:, int(cols[0]) - col_start:int(cols[-1]) + 1 - col_start]
            else:
                sub = block.index_select(1, cols - col_start)
            self._merge_block(g, sub, cols)

    def _merge_block(self, g: _Group, sub: torch.Tensor, cols: torch.Tensor) -> None:
        cap = g.vals.shape[1]
        # Blocks arrive in column order, so a new score equal to the smallest kept one has a
        # larger index and loses the tie: only rows whose block maximum beats it can change,
        # and after the first few blocks those are few.
        rows = (sub.amax(dim=1) > g.vals[:, -1]).nonzero().flatten()
        if len(rows) == 0:
            return
        if 2 * len(rows) > self.n_images:  # most rows: cheaper than copying them out
            bv, bi = _top_by_key(sub, cols, cap)
            g.vals, g.idx = _top_by_key(torch.cat([g.vals, bv], 1), torch.cat([g.idx, bi], 1), cap)
            return
        bv, bi = _top_by_key(sub[rows], cols, cap)
        v, i = _top_by_key(torch.cat([g.vals[rows], bv], 1), torch.cat([g.idx[rows], bi], 1), cap)
        g.vals[rows], g.idx[rows] = v, i

    def consume(self, source: BlockSource) -> "StreamingReducer":
        if isinstance(source, (str, bytes)):
            raise ValueError(f"scores is a {type(source).__name__}; pass a tensor, column blocks or a "
                             "callable returning them")
        self.source = source
        for item in _iterate(source):
            try:
                c0, block = item
            except (TypeError, ValueError):
                c0 = None
            if isinstance(c0, bool) or not isinstance(c0, numbers.Integral):
                raise ValueError("score blocks must be (col_start, [N, b] tensor) pairs with an integer "
                                 f"col_start; got {type(item).__name__} {str(item)[:40]}")
            self.update(int(c0), block)
        if self._next_col != self.n_pairs:
            raise ValueError(f"score blocks covered {self._next_col} of {self.n_pairs} pair columns; "
                             "stream every column")
        return self

    # -- evaluation ----------------------------------------------------------------------------
    def _multiplier(self, seen: bool, feasible: bool) -> float:
        if not self.masking:
            return 1.0
        return float(feasible) + float(seen)

    def _lists(self, j: int):
        """Per image, at threshold index j (-1: every pair feasible), the merged lists.

        Returns (seen_v, seen_i) top-k seen candidates (masked scores), kth_seen, (un_v, un_i)
        the kept unseen candidates (masked, unbiased), the unkept bound ``un_bound``, and the
        masked gt score.
        """
        k = self.inp.topk
        n = self.n_images
        seen_parts, seen_all_parts, un_parts, bounds = [], [], [], []
        for g in self.groups:
            feasible = g.bin >= j + 1
            mult = self._multiplier(g.seen, feasible)
            kept_v, kept_i = g.vals[:, :-1], g.idx[:, :-1]
            if g.seen:
                seen_all_parts.append(kept_v[:, :k] * mult)
                if g.candidate:
                    seen_parts.append((kept_v[:, :k] * mult, kept_i[:, :k]))
            elif mult:  # a feasible unseen candidate group
                un_parts.append((kept_v, kept_i))
                bounds.append(g.vals[:, -1])
        # unseen candidates masked to 0: all share one value, so the lowest indices win ties
        if self.masking and j >= 0:
            infeasible = ((~self.inp.seen_mask) & self.inp.candidate & (self.pair_bin < j + 1)).nonzero().flatten()
            if len(infeasible):
                # The k lowest-index zeros suffice and need no bound: any other masked pair ties
                # with all of them at a larger index, so at least k entries rank above it.
                zi = infeasible[:k].expand(n, -1)
                un_parts.append((torch.zeros(n, zi.shape[1]), zi))
        sv, si = _sort_by_key(torch.cat([p[0] for p in seen_parts], 1), torch.cat([p[1] for p in seen_parts], 1)) \
            if seen_parts else (torch.full((n, 0), _NEG), torch.zeros((n, 0), dtype=torch.long))
        kth_seen = torch.cat(seen_all_parts, 1).topk(k, dim=1).values[:, -1] if seen_all_parts \
            else torch.full((n,), _NEG)
        if un_parts:
            uv = torch.cat([p[0] for p in un_parts], 1)
            ui = torch.cat([p[1] for p in un_parts], 1)
            cap = self.cap - 1
            if uv.shape[1] > cap:
                all_v, all_i = _sort_by_key(uv, ui)
                bounds.append(all_v[:, cap])
                uv, ui = all_v[:, :cap], all_i[:, :cap]
            else:
                uv, ui = _sort_by_key(uv, ui)
        else:
            uv, ui = torch.full((n, 0), _NEG), torch.zeros((n, 0), dtype=torch.long)
        bound = torch.stack(bounds, 1).max(1).values if bounds else torch.full((n,), _NEG)
        gt = self.inp.gt
        gt_mult = torch.ones(n)
        if self.masking:
            feasible_gt = self.pair_bin[gt] >= j + 1
            gt_mult = feasible_gt.float() + self.inp.seen_mask[gt].float()
        return sv[:, :k], si[:, :k], kth_seen, uv, ui, bound, self.gt_score * gt_mult

    def _predict(self, lists, bias: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k indices at ``bias`` and a per-image flag: kept scores cannot decide."""
        sv, si, _, uv, ui, bound, _ = lists
        b = torch.tensor(bias, dtype=torch.float32)
        vals = torch.cat([sv[:, :k], uv + b], 1)
        idx = torch.cat([si[:, :k], ui], 1)
        v, i = _sort_by_key(vals, idx)
        unsafe = (bound + b) >= v[:, k - 1]
        return i[:, :k], unsafe & torch.isfinite(bound)

    def evaluate(self, j: int = -1) -> EvalResult:
        """Metrics at threshold index ``j`` of the grid (-1: no threshold / all feasible)."""
        if j < 0 and self.masking and not self.track_all_feasible:
            raise ValueError("this reducer was built with track_all_feasible=False; it cannot "
                             "evaluate with every pair feasible")
        if self._next_col != self.n_pairs:
            raise ValueError("the reducer has not seen every pair column; call consume() first")
        if self.gt_score.isnan().any():
            raise ValueError("internal: an image's own score was never seen in the blocks")
        inp = self.inp
        k = inp.topk
        lists = self._lists(j)
        gt_masked = lists[6]
        img_unseen = inp.img_unseen
        n_unseen = int(img_unseen.sum())
        n_seen = len(inp.gt) - n_unseen

        # Images whose kept scores cannot decide some bias point are re-read from the source and
        # decided densely; the end point also fixes which gaps are kept, so iterate to a fixpoint.
        fixed_rows: list[int] = []
        fixed: tuple[torch.Tensor, _Inputs] | None = None

        def matches(bias: float, topk: int, undecided: set[int]) -> torch.Tensor:
            pred, unsafe = self._predict(lists, bias, topk)
            m = (pred == inp.gt[:, None]).any(1)
            undecided.update(unsafe.nonzero().flatten().tolist())
            if fixed is not None:
                m[torch.tensor(fixed_rows)] = _matches(fixed[0], fixed[1], bias)
            return m

        while True:
            undecided: set[int] = set()
            end = matches(MAX_BIAS, k, undecided)
            gap = lists[2][img_unseen] - gt_masked[img_unseen]
            kept_gaps = gap[end[img_unseen]]
            biases = bias_list(kept_gaps).tolist() if len(kept_gaps) else []
            per_bias = [matches(b, k, undecided) for b in biases]
            pred0, unsafe0 = self._predict(lists, 0.0, 1)
            undecided.update(unsafe0.nonzero().flatten().tolist())
            new_rows = sorted(undecided - set(fixed_rows))
            if not new_rows:
                break
            if self.source is None or not _reiterable(self.source):
                raise ValueError(
                    f"{len(new_rows)} image(s) have float32 near-ties the kept scores cannot resolve; "
                    "pass the scores as a callable returning the block iterator (or a tensor) so they "
                    "can be re-read, or raise `margin`")
            fixed_rows = sorted(set(fixed_rows) | set(new_rows))
            fixed = self._dense_rows(fixed_rows, j)
        if fixed is not None:
            s0 = fixed[0].clone()
            s0[:, ~inp.candidate] = -1e10
            pred0[torch.tensor(fixed_rows), 0] = s0.argmax(1)

        curve_seen = [_mean(m[~img_unseen]) for m in per_bias] + [_mean(end[~img_unseen])]
        curve_unseen = [_mean(m[img_unseen]) for m in per_bias] + [_mean(end[img_unseen])]
        curve_seen = [0.0 if math.isnan(v) else v for v in curve_seen]
        curve_unseen = [0.0 if math.isnan(v) else v for v in curve_unseen]
        attr_acc = obj_acc = None
        if inp.pair_attr is not None:
            p = pred0[:, 0]
            attr_acc = _mean(inp.pair_attr[p] == inp.pair_attr[inp.gt])
            obj_acc = _mean(inp.pair_obj[p] == inp.pair_obj[inp.gt])
        threshold = self.threshold_value(j)
        return finish(curve_seen, curve_unseen, biases + [MAX_BIAS], attr_acc, obj_acc, inp,
                      n_seen, n_unseen, threshold)

    def threshold_value(self, j: int) -> float | None:
        if not self.masking:
            return None
        return self.thresholds[j] if j >= 0 else OPEN_WORLD_FALLBACK_THRESHOLD

    def _dense_rows(self, rows: list[int], j: int) -> tuple[torch.Tensor, _Inputs]:
        r = torch.tensor(rows)
        full = torch.empty(len(rows), self.n_pairs)
        for c0, block in _iterate(self.source):
            block = torch.as_tensor(block).detach().to("cpu", torch.float32)
            full[:, c0:c0 + block.shape[1]] = block[r]
        if self.masking:
            feasible = (self.pair_bin >= j + 1).float()
            full = full * (feasible + self.inp.seen_mask.float())
        sub = _Inputs(self.inp.gt[r], self.inp.seen_mask, self.inp.candidate, self.inp.pair_attr,
                      self.inp.pair_obj, self.inp.topk, self.n_pairs)
        return full, sub


# The reference search starts from threshold -10 (everything feasible) and keeps it when no
# grid threshold gives a positive validation AUC.
OPEN_WORLD_FALLBACK_THRESHOLD = -10.0


def evaluate_stream(blocks: BlockSource, gt_pair, seen_mask, candidate_mask=None, pair_attr=None,
                    pair_obj=None, topk: int = 1, n_pairs: int | None = None,
                    margin: int = 4) -> EvalResult:
    """:func:`~czsl_bench.evaluation.evaluate` over scores streamed as column blocks.

    ``blocks``: a tensor, an iterable of ``(col_start, [N, b] block)`` in column order, or a
    callable returning such an iterable (re-iterable sources let rare float32 near-ties be
    resolved exactly by re-reading a few rows). ``n_pairs`` defaults to ``len(seen_mask)``.
    """
    if n_pairs is None:
        n_pairs = blocks.shape[1] if isinstance(blocks, torch.Tensor) and blocks.dim() == 2 \
            else vector_length(seen_mask, "seen_mask")
    n_images = vector_length(gt_pair, "gt_pair")
    red = StreamingReducer(n_images, n_pairs, gt_pair, seen_mask, candidate_mask, pair_attr,
                           pair_obj, topk, margin=margin)
    return red.consume(blocks).evaluate()
