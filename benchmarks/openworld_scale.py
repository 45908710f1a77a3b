"""A C-GQA-sized open-world evaluation, run as its own process so its peak memory is measurable.

    python benchmarks/openworld_scale.py --images 5098 --attrs 413 --objs 674 [--search]

Scores are generated block by block from low-rank random "CLIP" features (the evaluator never
sees the whole matrix); prints one JSON line: wall time, peak RSS, metrics.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from czsl_bench.evaluation.feasibility import evaluate_open_world, search_threshold


def make_problem(n_images: int, n_attrs: int, n_objs: int, dim: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_pairs = n_attrs * n_objs
    seen = torch.zeros(n_pairs, dtype=torch.bool)
    seen[torch.randperm(n_pairs, generator=g)[: n_pairs // 50]] = True  # ~2 % seen, as C-GQA
    feas = torch.rand(n_pairs, generator=g) * 0.9 - 0.1
    feas[seen] = 0
    text = torch.nn.functional.normalize(torch.randn(n_pairs, dim, generator=g), dim=1)
    seen_idx = seen.nonzero().flatten()
    # half the images from seen pairs, half from feasible-looking unseen pairs
    likely = ((~seen) & (feas > 0.4)).nonzero().flatten()
    gt = torch.cat([seen_idx[torch.randint(len(seen_idx), (n_images // 2,), generator=g)],
                    likely[torch.randint(len(likely), (n_images - n_images // 2,), generator=g)]])
    img = torch.nn.functional.normalize(text[gt] + 0.45 * torch.randn(n_images, dim, generator=g), dim=1)
    pair_attr = torch.arange(n_pairs) // n_objs
    pair_obj = torch.arange(n_pairs) % n_objs
    return img, text, gt, seen, feas, pair_attr, pair_obj


def blocks_of(img: torch.Tensor, text: torch.Tensor, block: int = 2048):
    def gen():
        for c0 in range(0, len(text), block):
            yield c0, 100.0 * img @ text[c0:c0 + block].T
    return gen


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not getrusage: ru_maxrss survives exec on Linux, so a
    child of a big pytest process would report its parent's peak."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5098)
    ap.add_argument("--attrs", type=int, default=413)
    ap.add_argument("--objs", type=int, default=674)
    ap.add_argument("--search", action="store_true", help="also run the 50-threshold search")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    img, text, gt, seen, feas, pa, po = make_problem(a.images, a.attrs, a.objs)
    t0 = time.perf_counter()
    out = {}
    threshold = 0.5
    if a.search:
        s = search_threshold(blocks_of(img, text), gt, seen, feas, pa, po)
        threshold = s.threshold
        out["search_s"] = time.perf_counter() - t0
        out["val_auc"] = s.val.auc
    t1 = time.perf_counter()
    r = evaluate_open_world(blocks_of(img, text), gt, seen, feas, threshold, pa, po)
    out["test_s"] = time.perf_counter() - t1
    out.update(seconds=time.perf_counter() - t0,
               peak_rss_mb=peak_rss_mb(),
               images=a.images, pairs=a.attrs * a.objs, threshold=threshold,
               auc=r.auc, best_hm=r.best_hm, n_bias=len(r.biases))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
