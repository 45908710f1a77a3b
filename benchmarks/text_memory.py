"""Peak memory of the text side of one training step, with and without chunked checkpointing.

    python benchmarks/text_memory.py [--arch ViT-L-14] [--prompts 6679] [--sizes 256,512]
                                     [--image-batch 0]

Each measurement runs in a fresh subprocess (``--one``): it builds the random-weight backbone,
makes ``P`` prompts of C-GQA's shape (context length 8: SOT, 3 prefix tokens, attribute, object,
EOT, pad) whose vocabulary rows are trainable, encodes them with gradients (as CSP and the
three-path methods do every step), takes a cross-entropy against random image features and runs
the backward. Reported: the peak resident set size of the step minus the resident set size just
before it (``resource.getrusage`` maxrss vs ``/proc/self/statm``): the memory the step itself
needs on top of the weights. ``tracemalloc`` would not see torch's allocations.

C-GQA's training vocabulary is 5,592 seen pairs + 413 attributes + 674 objects = 6,679 prompts per
step (the C-GQA split files, docs/datasets.md). On a CPU a full ViT-L-14 pass over all of them takes
minutes, so by default it measures at ``--sizes`` prompts and extrapolates linearly (the saved
activations grow with the number of prompts; a fit of two sizes gives the per-prompt slope).
``--image-batch B`` measures the image side instead: B images at 224 px through the visual tower
with trainable adapters (the three-path methods tune it), forward and backward.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CGQA_PROMPTS = 5592 + 413 + 674


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one(arch: str, prompts: int, checkpoint: bool, chunk: int, image_batch: int) -> dict:
    import torch
    import torch.nn.functional as F

    from czsl_bench.backbone import load_backbone
    from czsl_bench.text_memory import encode_text

    torch.manual_seed(0)
    backbone = load_backbone(arch, None, device="cpu", precision="fp32")
    for p in backbone.model.parameters() if hasattr(backbone, "model") else []:
        p.requires_grad_(False)
    if image_batch:
        backbone.add_adapters(bottleneck=64, dropout=0.0, scale=0.1)
        size = getattr(backbone, "image_size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size
        images = torch.randn(image_batch, 3, size, size)
        target = torch.randint(0, 10, (image_batch,))
        head = torch.randn(10, int(backbone.embed_dim))
        before_rss, before_max = _rss_mib(), _maxrss_mib()
        t0 = time.perf_counter()
        cls, _ = backbone.encode_image_tokens(images)
        loss = F.cross_entropy(F.normalize(cls.float(), dim=-1) @ head.t(), target)
        loss.backward()
    else:
        ids = backbone.tokenize(["a photo of x x"], context_length=8)
        eot = backbone.eot_index(ids)
        template = backbone.token_embedding(ids).detach().float()
        vocab = torch.nn.Parameter(torch.randn(prompts, 2, template.shape[-1]) * 0.02)
        image = F.normalize(torch.randn(16, int(backbone.embed_dim)), dim=-1)
        target = torch.randint(0, prompts, (16,))
        before_rss, before_max = _rss_mib(), _maxrss_mib()
        t0 = time.perf_counter()
        emb = template.expand(prompts, -1, -1).clone()
        e = int(eot[0])
        emb[:, e - 2:e] = vocab
        text = F.normalize(encode_text(backbone, emb, eot.expand(prompts), chunk=chunk, checkpoint=checkpoint).float(),
                           dim=-1)
        loss = F.cross_entropy(100 * image @ text.t(), target)
        loss.backward()
    seconds = time.perf_counter() - t0
    after_max = _maxrss_mib()
    return dict(arch=arch, prompts=prompts, checkpoint=checkpoint, chunk=chunk, image_batch=image_batch,
                rss_before_mib=round(before_rss, 1), peak_mib=round(after_max, 1),
                step_mib=round(after_max - before_rss, 1), peak_before_step_mib=round(before_max, 1),
                seconds=round(seconds, 1), threads=torch.get_num_threads())


def run(arch: str, prompts: int, checkpoint: bool, chunk: int, image_batch: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--one", "--arch", arch, "--prompts", str(prompts), "--chunk", str(chunk),
           "--image-batch", str(image_batch)] + (["--checkpoint"] if checkpoint else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="ViT-L-14")
    ap.add_argument("--prompts", type=int, default=CGQA_PROMPTS)
    ap.add_argument("--sizes", default="256,512", help="prompt counts measured for the extrapolation ('' = measure --prompts)")
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--checkpoint", action="store_true")
    ap.add_argument("--image-batch", type=int, default=0)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.arch, args.prompts, args.checkpoint, args.chunk, args.image_batch)))
        return
    if args.image_batch:
        print(json.dumps(run(args.arch, 0, False, 0, args.image_batch)))
        return
    sizes = [int(s) for s in args.sizes.split(",") if s] or [args.prompts]
    for checkpoint in ((True,) if args.checkpoint else (False, True)):  # --checkpoint: that mode only
        rows = [run(args.arch, n, checkpoint, args.chunk if checkpoint else 0) for n in sizes]
        for r in rows:
            print(json.dumps(r))
        if len(rows) >= 2:
            (a, b) = rows[0], rows[-1]
            slope = (b["step_mib"] - a["step_mib"]) / (b["prompts"] - a["prompts"])
            at = a["step_mib"] + slope * (args.prompts - a["prompts"])
            print(json.dumps(dict(checkpoint=checkpoint, chunk=args.chunk if checkpoint else 0,
                                  mib_per_prompt=round(slope, 3), extrapolated_prompts=args.prompts,
                                  extrapolated_step_mib=round(at, 1))))


if __name__ == "__main__":
    main()
