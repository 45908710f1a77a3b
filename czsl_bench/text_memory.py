"""Memory of the text side in training: chunked encoding with optional activation checkpointing.

CSP and the three-path methods (Troika, ClusPro, ...) run the text encoder *with gradients* on
every training pair's prompt at every step: 5,592 composition prompts plus 1,087 primitive
prompts on C-GQA. Autograd keeps every text-transformer activation of all of them until the
backward, which is what runs a 24 GB GPU out of memory (docs/distributed.md has the measured
figures). Two settings change only the memory and the time, never the numbers (up to float
summation order):

* ``CZSL_TEXT_CHUNK=N``: encode at most N prompts per text-encoder call (0 or unset: all at once).
  On its own this bounds the transient buffers of one call, not what autograd saves;
* ``CZSL_TEXT_CHECKPOINT=1``: activation checkpointing per chunk (``torch.utils.checkpoint``,
  non-reentrant): only each chunk's input and output are kept; its activations are recomputed
  chunk by chunk in the backward, so the text side's peak is one chunk's activations plus the
  [P, D] outputs, at the price of a second text forward. Without ``CZSL_TEXT_CHUNK`` the chunk
  is 512 prompts.

They are environment settings (they reach every rank under torchrun and every Slurm task
unchanged) and, changing no number, they are not in the run identity, like ``--eval-batch-size``.
In evaluation (no gradients) nothing here applies: scoring already encodes in blocks.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

DEFAULT_CHECKPOINT_CHUNK = 512


def settings() -> tuple[int, bool]:
    """``(chunk, checkpoint)`` from the environment (0 = no chunking)."""
    raw = os.environ.get("CZSL_TEXT_CHUNK", "").strip()
    try:
        chunk = int(raw) if raw else 0
    except ValueError:
        raise ValueError(f"CZSL_TEXT_CHUNK={raw!r} is not an integer (prompts per text-encoder call)") from None
    if chunk < 0:
        raise ValueError(f"CZSL_TEXT_CHUNK={chunk} must be >= 0 (0 = all prompts at once)")
    checkpoint = os.environ.get("CZSL_TEXT_CHECKPOINT", "").strip().lower() in ("1", "true", "yes", "on")
    if checkpoint and chunk == 0:
        chunk = DEFAULT_CHECKPOINT_CHUNK
    return chunk, checkpoint


def encode_text(backbone: Any, embeddings: Tensor, eot_index: Tensor, chunk: int | None = None,
                checkpoint: bool | None = None) -> Tensor:
    """``backbone.encode_text_embeddings(embeddings, eot_index)`` ``[P, D]``, in chunks of
    ``chunk`` prompts and with activation checkpointing per chunk when asked (defaults:
    :func:`settings`). Without gradients, or with neither setting, it is the plain call."""
    if chunk is None or checkpoint is None:
        env_chunk, env_ckpt = settings()
        chunk = env_chunk if chunk is None else chunk
        checkpoint = env_ckpt if checkpoint is None else checkpoint
    n = embeddings.shape[0]
    if not torch.is_grad_enabled() or ((chunk <= 0 or chunk >= n) and not checkpoint):
        return backbone.encode_text_embeddings(embeddings, eot_index)
    step = chunk if chunk > 0 else n
    outs = []
    for start in range(0, n, step):
        emb, eot = embeddings[start:start + step], eot_index[start:start + step]
        if checkpoint:
            outs.append(torch.utils.checkpoint.checkpoint(backbone.encode_text_embeddings, emb, eot,
                                                          use_reentrant=False))
        else:
            outs.append(backbone.encode_text_embeddings(emb, eot))
    return torch.cat(outs)
