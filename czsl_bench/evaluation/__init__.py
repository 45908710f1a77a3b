"""The one CZSL evaluator: closed and open world, dense or streamed.

    from czsl_bench.evaluation import evaluate
    result = evaluate(scores, gt_pair, seen_mask, candidate_mask, pair_attr, pair_obj)
    result.auc, result.best_hm, result.best_seen, result.best_unseen

See docs/evaluation.md for the protocol, its version string and the tie policy.
"""

from .metrics import PROTOCOL_VERSION, EvalResult, evaluate, evaluate_dense, evaluate_split
from .streaming import StreamingReducer, dense_blocks, evaluate_stream

__all__ = [
    "PROTOCOL_VERSION", "EvalResult", "evaluate", "evaluate_dense", "evaluate_split", "evaluate_stream",
    "StreamingReducer", "dense_blocks",
]
