"""CLIP contrastive pretraining of the embedded tiny backbone on the synthetic world's web corpus.

The model is an open_clip custom config (``czsl_bench/data/backbones/czsl-tiny-vit.json``:
ViT width 128, 4 layers, patch 8, 64 px; text tower width 128, 4 layers, 32-token context, the
standard 49,408-token CLIP BPE vocabulary so soft-prompt code works unchanged). It is trained
from scratch with the symmetric InfoNCE loss of CLIP (Radford et al. 2021) on noisy image-caption
pairs of the synthetic world (``web_corpus``). By default the web corpus leaves out the unseen
validation and test pairs of the default natural split, so zero-shot recognition of them is a
real test of composition. The checkpoint is a plain fp16 state dict of open_clip's ``CLIP``
(keys as ``open_clip.create_model('czsl-tiny-vit')``) in safetensors.

    czsl-bench backbone pretrain --out czsl_bench/data/backbones     # the committed run
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

TINY_ARCH = "czsl-tiny-vit"
TINY_TAG = "synthetic"
BACKBONE_DIR = Path(__file__).resolve().parent / "data" / "backbones"
TINY_CONFIG_FILE = BACKBONE_DIR / f"{TINY_ARCH}.json"
ZERO_SHOT_TEMPLATE = "a photo of {attr} {obj}"
# OpenAI CLIP normalisation (open_clip's default for custom configs).
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


def checkpoint_name(tag: str = TINY_TAG) -> str:
    return f"{TINY_ARCH}-{tag}.safetensors"


def record_name(tag: str = TINY_TAG) -> str:
    # Not "<arch>.json": open_clip's config scan of this folder must not mistake it for a model
    # config (it is also nested so it lacks the top-level embed_dim/vision_cfg/text_cfg keys).
    return f"{TINY_ARCH}-{tag}.training.json"


def tiny_pretrained_path(tag: str = TINY_TAG) -> Path:
    """The committed checkpoint for ``tag`` (``synthetic``)."""
    path = BACKBONE_DIR / checkpoint_name(tag)
    if not path.is_file():
        raise FileNotFoundError(f"no packaged {TINY_ARCH} checkpoint for tag {tag!r} at {path}; "
                                "run `czsl-bench backbone pretrain --out czsl_bench/data/backbones`")
    return path


def register_tiny_arch() -> None:
    """Make ``czsl-tiny-vit`` known to open_clip (idempotent)."""
    import open_clip

    if TINY_ARCH not in open_clip.list_models():
        open_clip.add_model_config(TINY_CONFIG_FILE)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the pretrained weights (recorded in the training record)."""

    seed: int = 0  # initialisation and batch order
    web_seed: int = 1  # the web corpus has its own seed, distinct from the CZSL world's (0)
    world_seed: int = 0  # which natural split's unseen pairs are left out of the corpus
    n_images: int = 20000
    image_size: int = 64
    exclude_heldout: bool = True  # leave the unseen val/test pairs out of the web corpus
    steps: int = 1500
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 50
    hflip: bool = True
    threads: int = 2  # the committed run; on a busy, shared CPU 1 thread is far faster (docs/synthetic-world.md)
    log_every: int = 25


@dataclass
class PretrainResult:
    state_dict: dict
    record: dict[str, Any] = field(default_factory=dict)


def _normalise(images_uint8, hflip_mask=None):
    import torch

    x = images_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    if hflip_mask is not None and bool(hflip_mask.any()):
        x[hflip_mask] = x[hflip_mask].flip(-1)
    mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up then cosine decay to zero (open_clip's default schedule)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def create_tiny_model():
    """A randomly initialised ``czsl-tiny-vit`` (open_clip ``CLIP``) and its tokenizer."""
    import open_clip

    register_tiny_arch()
    model = open_clip.create_model(TINY_ARCH, pretrained=None)
    return model, open_clip.get_tokenizer(TINY_ARCH)


def pretrain(cfg: PretrainConfig = PretrainConfig(), corpus=None, log: Callable[[str], None] = print
             ) -> PretrainResult:
    """Train ``czsl-tiny-vit`` from scratch with the CLIP loss; returns weights and a record.

    ``corpus`` (images uint8 [N, H, W, 3], captions) overrides the generated web corpus (tests).
    """
    import torch

    if cfg.steps < 1 or cfg.batch_size < 2:
        raise ValueError(f"pretraining needs steps >= 1 and batch_size >= 2, got {cfg.steps} and {cfg.batch_size}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(cfg, corpus, log)
    finally:
        torch.set_num_threads(previous_threads)  # a library call must not leave the process changed


def _pretrain(cfg: PretrainConfig, corpus, log: Callable[[str], None]) -> PretrainResult:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from czsl_bench.datasets.synthetic import SyntheticConfig, heldout_pairs
    from czsl_bench.seeding import seed_everything

    seed_everything(cfg.seed)
    t_start = time.perf_counter()
    excluded: list[tuple[str, str]] = []
    cache_state = "given"
    if corpus is None:
        if cfg.exclude_heldout:
            excluded = heldout_pairs(SyntheticConfig(seed=cfg.world_seed))
        images, captions, cache_state = _cached_web_corpus(cfg, excluded)
    else:
        images, captions = corpus
    t_corpus = time.perf_counter() - t_start
    n = len(captions)
    if n < 2 or len(images) != n:
        raise ValueError(f"the corpus needs at least 2 image-caption pairs with one caption per image, "
                         f"got {len(images)} images and {n} captions")
    log(f"web corpus: {n} images, {len(excluded)} held-out pairs excluded ({t_corpus:.1f} s, {cache_state})")

    model, tokenizer = create_tiny_model()
    images_t = torch.from_numpy(np.ascontiguousarray(images))
    tokens = tokenizer(list(captions))
    decay = [p for name, p in model.named_parameters()
             if p.ndim >= 2 and "ln" not in name and "bn" not in name and "logit_scale" not in name]
    no_decay = [p for name, p in model.named_parameters()
                if not (p.ndim >= 2 and "ln" not in name and "bn" not in name and "logit_scale" not in name)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = min(cfg.batch_size, n)
    order, pos = torch.randperm(n, generator=gen), 0
    curve: list[dict[str, float]] = []
    model.train()
    t_train = time.perf_counter()
    running = 0.0
    for step in range(cfg.steps):
        if pos + batch > n:  # a new epoch: reshuffle, drop the incomplete tail
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        flip = torch.rand(batch, generator=gen) < 0.5 if cfg.hflip else None
        x = _normalise(images_t[idx], flip)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(tokens[idx]), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
        target = torch.arange(batch)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP caps the temperature at 100
        running += loss.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            k = (step % cfg.log_every) + 1
            elapsed = time.perf_counter() - t_train
            curve.append({"step": step + 1, "loss": running / k, "elapsed_s": round(elapsed, 1)})
            log(f"step {step + 1}/{cfg.steps}  loss {running / k:.4f}  "
                f"lr {_lr_at(step, cfg):.2e}  {(step + 1) * batch / elapsed:.0f} samples/s")
            running = 0.0
    train_s = time.perf_counter() - t_train
    model.eval()
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    record = {
        "arch": TINY_ARCH,
        "tag": TINY_TAG,
        "config": asdict(cfg),
        "model_config": json.loads(TINY_CONFIG_FILE.read_text()),
        "corpus": {"n_images": n, "excluded_pairs": [f"{a} {o}" for a, o in excluded],
                   "generator": "czsl_bench.datasets.synthetic.web_corpus" if corpus is None else "given",
                   "cache": cache_state},
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "loss_curve": curve,
        "final_loss": curve[-1]["loss"] if curve else None,
        "timing": {"corpus_s": round(t_corpus, 1), "train_s": round(train_s, 1),
                   "total_s": round(time.perf_counter() - t_start, 1),
                   "samples_per_s": round(cfg.steps * batch / train_s, 1)},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    # a shared machine makes the timings pessimistic: record how busy it was
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "versions": _versions(),
    }
    return PretrainResult(state, record)


def _cached_web_corpus(cfg: PretrainConfig, excluded: list[tuple[str, str]]):
    """The web corpus for ``cfg``, rendered once and cached as ``$CZSL_CACHE/web/<key>.npz``
    (the corpus is a pure function of the key, so a cached copy is identical to a fresh one).

    The file stores its key and a sha256 of its content; a file that is damaged, truncated or
    not the corpus of this key is reported, deleted and rendered again, never trained on.
    """
    import numpy as np

    from czsl_bench.datasets.synthetic import GENERATOR_VERSION, WEB_CORPUS_VERSION, default_cache_dir, web_corpus

    key = json.dumps({"v": GENERATOR_VERSION, "web": WEB_CORPUS_VERSION, "n": cfg.n_images, "seed": cfg.web_seed, "size": cfg.image_size,
                      "exclude": [f"{a} {o}" for a, o in excluded]}, sort_keys=True)
    path = default_cache_dir().parent / "web" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        try:
            with np.load(path) as data:
                if "sha256" not in data.files:
                    raise ValueError("written before corpus files carried a checksum")
                images, captions = data["images"], [str(c) for c in data["captions"]]
                if str(data["key"]) != key:
                    raise ValueError("it holds another corpus")
                if str(data["sha256"]) != _corpus_checksum(images, captions):
                    raise ValueError("checksum mismatch")
            return images, captions, "cache hit"
        except Exception as exc:  # noqa: BLE001 - zip CRC, truncation, missing arrays: all mean re-render
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            logging.getLogger(__name__).warning(
                "web corpus cache file %s is damaged (%s); deleting it and rendering the corpus again", path, reason)
            path.unlink(missing_ok=True)
    images, captions, _ = web_corpus(cfg.n_images, cfg.web_seed, cfg.image_size, excluded, workers=2)
    from czsl_bench.atomic import atomic_file

    with atomic_file(path) as handle:
        np.savez(handle, images=images, captions=np.array(captions), key=np.array(key),
                 sha256=np.array(_corpus_checksum(images, captions)))
    return images, captions, "rendered"


def _corpus_checksum(images, captions: list[str]) -> str:
    import numpy as np

    digest = hashlib.sha256(f"{images.dtype}|{images.shape}\n".encode())
    digest.update(np.ascontiguousarray(images).reshape(-1).view(np.uint8))  # no copy of the 245 MB
    digest.update("\n".join(captions).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import numpy
    import open_clip
    import torch

    from czsl_bench.datasets.synthetic import GENERATOR_VERSION, WEB_CORPUS_VERSION

    return {"torch": torch.__version__, "open_clip": open_clip.__version__, "numpy": numpy.__version__,
            "synthetic_generator": GENERATOR_VERSION, "web_corpus": WEB_CORPUS_VERSION}


def zero_shot_scores(model, tokenizer, split, template: str = ZERO_SHOT_TEMPLATE, batch_size: int = 256):
    """``[N images, P pairs]`` cosine similarities of images and "a photo of {attr} {obj}" prompts."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from czsl_bench.names import clean_name

    prompts = [template.format(attr=clean_name(a), obj=clean_name(o)) for a, o in split.pairs]
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
        feats = []
        for start in range(0, len(split.images), batch_size):
            arr = np.stack([np.asarray(Image.open(split.root / p).convert("RGB"))
                            for p in split.images[start:start + batch_size]])
            feats.append(F.normalize(model.encode_image(_normalise(torch.from_numpy(arr))), dim=-1))
        return torch.cat(feats) @ text.t()


def evaluate_zero_shot(model, tokenizer, dataset, split_name: str = "test", world: str = "closed") -> dict:
    """Zero-shot metrics of ``model`` on a split, with the project's evaluator (fractions)."""
    from czsl_bench.evaluation import evaluate_split

    split = dataset.split(split_name, world=world)
    scores = zero_shot_scores(model, tokenizer, split)
    res = evaluate_split(scores.float(), split)
    out = {k: (None if v is None else round(float(v), 4)) for k, v in res.summary().items()}
    out.update({"split": split_name, "world": world, "protocol": res.protocol, "n_images": res.n_images,
                "n_pairs": res.n_pairs, "n_candidates": res.n_candidates, "template": ZERO_SHOT_TEMPLATE,
                "chance_pair_top1": round(1.0 / res.n_candidates, 4)})
    return out


def save_checkpoint(result: PretrainResult, out_dir: str | os.PathLike, tag: str = TINY_TAG) -> tuple[Path, Path]:
    """Write ``<arch>-<tag>.safetensors`` and its training record atomically into ``out_dir``."""
    from safetensors.torch import save_file

    from czsl_bench.atomic import atomic_path, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, rec = out / checkpoint_name(tag), out / record_name(tag)
    # One metadata key: safetensors writes a multi-key metadata map in arbitrary order, which
    # would make the bytes (and the recorded sha256) of identical weights differ between runs.
    meta = json.dumps({"arch": TINY_ARCH, "tag": tag, "format": "open_clip CLIP state_dict"}, sort_keys=True)
    with atomic_path(ckpt) as tmp:
        save_file(result.state_dict, str(tmp), metadata={"czsl_bench": meta})
    result.record["checkpoint"] = {"file": ckpt.name, "bytes": ckpt.stat().st_size,
                                   "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(), "dtype": "float16"}
    if out.resolve() != BACKBONE_DIR.resolve():  # keep the config beside a checkpoint written elsewhere
        atomic_write_text(out / TINY_CONFIG_FILE.name, TINY_CONFIG_FILE.read_text())
    atomic_write_text(rec, json.dumps(result.record, indent=1) + "\n")
    return ckpt, rec


def load_tiny(path: str | os.PathLike | None = None):
    """``czsl-tiny-vit`` with the weights at ``path`` (default: the committed ``synthetic`` tag), in eval mode."""
    from safetensors.torch import load_file

    model, tokenizer = create_tiny_model()
    state = load_file(str(path or tiny_pretrained_path()))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval(), tokenizer
