"""The CLIP model every method shares: a frozen open_clip CLIP, adapters, soft-prompt text encoder.

Built by :func:`czsl_bench.backbone.load_backbone` (loading, weights, devices live there).
Everything here wraps open_clip's own modules (no fork of its code). The visual block loop is
re-run here so that parallel bottleneck adapters (docs/cluspro.md) can read each block's
un-normalised input; with the adapters at their zero initialisation the loop computes exactly
the operations of open_clip's ``ResidualAttentionBlock.forward`` in the same order, so the
features are bit-identical to the plain model (tested).

All CLIP weights are frozen after loading (``requires_grad=False``), including the token and
positional embeddings and the logit scale; a method that wants to train a part of CLIP says so
with :meth:`Backbone.unfreeze`. The CLIP modules always run in eval mode (they hold no dropout
or batch norm in the ViT configs used here); ``Backbone.train()`` switches only the adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from czsl_bench.hashing import tensors_sha256

__all__ = ["Backbone", "BottleneckAdapter"]


# --------------------------------------------------------------------------------------------
# adapters


class BottleneckAdapter(nn.Module):
    """AdaptFormer-style parallel adapter (docs/cluspro.md).

    ``Linear(width -> bottleneck) -> ReLU -> Dropout -> Linear(bottleneck -> width)``, output
    multiplied by a fixed ``scale``. The up-projection weight and both biases start at zero, so
    the adapter's output is exactly zero until it is trained; the down-projection uses
    kaiming-uniform with a = sqrt(5).
    """

    def __init__(self, width: int, bottleneck: int = 64, dropout: float = 0.1, scale: float = 0.1):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.dropout = nn.Dropout(dropout)
        self.scale = float(scale)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.dropout(F.relu(self.down(x)))) * self.scale


def _adapted_block(blk: nn.Module, x: Tensor, attn_adapter: nn.Module, mlp_adapter: nn.Module) -> Tensor:
    """open_clip's ResidualAttentionBlock.forward with the two parallel adapters added.

    ``x <- x + MHA(LN1(x)) + A_attn(x)``; ``x <- x + MLP(LN2(x)) + A_mlp(x)``: each adapter reads
    the un-normalised input of its sub-block. The residual sums keep open_clip's order, so a
    zero adapter adds an exact 0.
    """
    y = x + blk.ls_1(blk.attention(q_x=blk.ln_1(x)))
    y = y + attn_adapter(x)
    z = y + blk.ls_2(blk.mlp(blk.ln_2(y)))
    return z + mlp_adapter(y)


# --------------------------------------------------------------------------------------------
# the backbone


class Backbone(nn.Module):
    """A frozen open_clip CLIP model plus what CZSL methods add to it.

    Build it with :func:`load_backbone`. Public attributes: ``arch``, ``pretrained`` (what was
    asked for), ``weights_source`` (what was loaded), ``device``, ``precision`` (``"fp32"`` or
    ``"bf16"`` autocast), ``model`` (the open_clip CLIP), ``adapters`` (``nn.ModuleList``: the
    attention adapters of the adapted blocks in block order, then their MLP adapters; every block
    unless :meth:`add_adapters` was given ``blocks``), ``adapter_blocks`` (the adapted block indices),
    ``preprocess_train`` / ``preprocess_eval`` (open_clip transforms), ``tokenizer``.

    Encoders do not enter autocast on their own; wrap calls in :meth:`autocast`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        arch: str,
        pretrained: str | None,
        weights_source: str,
        device: torch.device,
        precision: str,
        preprocess_cfg: dict,
    ):
        super().__init__()
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.model = model
        self.arch = arch
        self.pretrained = pretrained
        self.weights_source = weights_source
        self.precision = precision
        self.preprocess_cfg = dict(preprocess_cfg)
        pp = PreprocessCfg(**self.preprocess_cfg)
        self.preprocess_train = image_transform_v2(pp, is_train=True)
        self.preprocess_eval = image_transform_v2(pp, is_train=False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.adapters = nn.ModuleList()
        self.adapter_blocks: tuple[int, ...] = ()
        self._weights_hash: str | None = None
        self.model.requires_grad_(False)
        self.model.eval()

    # ---- shapes and constants --------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the weights are (follows ``.to(...)``)."""
        return self.model.logit_scale.device

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def embed_dim(self) -> int:
        """Dimension of the joint image-text space (768 for ViT-L/14)."""
        return int(self.visual.output_dim)

    @property
    def vision_width(self) -> int:
        """Width of the visual transformer (1024 for ViT-L/14)."""
        return int(self.visual.transformer.width)

    @property
    def vision_layers(self) -> int:
        """Number of visual transformer blocks (24 for ViT-L/14)."""
        return len(self.visual.transformer.resblocks)

    @property
    def text_width(self) -> int:
        """Width of the text transformer = token embedding size (768 for ViT-L/14)."""
        return int(self._text_parts()["token_embedding"].embedding_dim)

    @property
    def context_length(self) -> int:
        """Number of text positions the model was built with (77 for CLIP)."""
        return int(self._text_parts()["positional_embedding"].shape[0])

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def logit_scale(self) -> Tensor:
        """``exp(logit_scale)`` of the checkpoint (100 for OpenAI CLIP), detached: it is frozen."""
        return self.model.logit_scale.detach().exp()

    @property
    def weights_hash(self) -> str:
        """sha256 of the CLIP weights (names, dtypes, shapes and bytes, in name order).

        Independent of the file format the weights came from; adapters are not included. Computed
        once on first use (about 1 s per GB of weights).
        """
        if self._weights_hash is None:
            self._weights_hash = tensors_sha256(self.model.state_dict())
        return self._weights_hash

    def describe_preprocess(self) -> dict:
        """Canonical description of the eval preprocessing, for cache keys."""
        cfg = self.preprocess_cfg
        return {
            "size": list(cfg["size"]) if isinstance(cfg["size"], (tuple, list)) else cfg["size"],
            "mode": cfg.get("mode", "RGB"),
            "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]],
            "interpolation": cfg["interpolation"],
            "resize_mode": cfg["resize_mode"],
            "fill_color": cfg.get("fill_color", 0),
        }

    # ---- precision, modes, freezing --------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA when precision is bf16; a no-op (fp32) otherwise."""
        if self.precision == "bf16":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train(self, mode: bool = True) -> Backbone:
        """Switch the adapters (dropout) between train and eval; CLIP itself stays in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    def unfreeze(self, *prefixes: str) -> list[nn.Parameter]:
        """Make the CLIP parameters whose names start with one of ``prefixes`` trainable.

        Names are those of ``backbone.model.named_parameters()``, e.g.
        ``"visual.transformer.resblocks.23"`` (PLID's last ViT block). Returns the parameters
        that were unfrozen; an unknown prefix is an error.
        """
        unfrozen: list[nn.Parameter] = []
        for prefix in prefixes:
            hits = [p for n, p in self.model.named_parameters() if n == prefix or n.startswith(prefix + ".")]
            if not hits:
                raise ValueError(f"no CLIP parameter is named {prefix!r} or starts with {prefix + '.'!r}")
            for p in hits:
                p.requires_grad_(True)
            unfrozen.extend(hits)
        return unfrozen

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Adapters plus any unfrozen CLIP parameters."""
        return [p for p in self.parameters() if p.requires_grad]

    # ---- adapters --------------------------------------------------------------------------
    def add_adapters(self, bottleneck: int = 64, dropout: float = 0.1, scale: float = 0.1,
                     blocks: Sequence[int] | None = None) -> list[nn.Parameter]:
        """Add two parallel bottleneck adapters (attention, MLP) to visual transformer blocks.

        Defaults are ClusPro/Troika's (docs/cluspro.md): bottleneck 64, dropout 0.1, scale 0.1;
        48 adapters and 6,343,680 parameters on ViT-L/14. ``blocks`` (indices, negative ones count
        from the end) limits them to those blocks, e.g. CAMS's last M (docs/cams.md); the default
        is every block. Returns the new (trainable) parameters.
        """
        from open_clip.transformer import ResidualAttentionBlock

        if len(self.adapters):
            raise ValueError("adapters were already added to this backbone")
        resblocks = self.visual.transformer.resblocks
        if not all(type(b) is ResidualAttentionBlock for b in resblocks):
            raise ValueError(f"adapters need open_clip ResidualAttentionBlock ViT blocks; {self.arch} has others")
        if getattr(self.visual, "attn_pool", None) is not None:
            raise ValueError(f"adapters are not supported on {self.arch} (attentional pooling)")
        n = len(resblocks)
        if blocks is None:
            chosen = list(range(n))
        else:
            bad = [int(b) for b in blocks if not -n <= int(b) < n]
            if bad:
                raise ValueError(f"adapter block(s) {bad} out of range: {self.arch} has {n} visual blocks (0..{n - 1})")
            chosen = sorted({int(b) % n for b in blocks})
            if not chosen:
                raise ValueError("add_adapters(blocks=...) got no block; pass None for every block")
        width = self.vision_width
        made = [BottleneckAdapter(width, bottleneck, dropout, scale) for _ in range(2 * len(chosen))]
        self.adapters.extend(made)
        self.adapters.to(self.device)
        self.adapters.train(self.training)
        self.adapter_blocks = tuple(chosen)
        return [p for a in made for p in a.parameters()]

    # ---- image side ------------------------------------------------------------------------
    def _visual_tokens(self, images: Tensor, adapters: bool) -> Tensor:
        """ln_pre'd tokens through every block (with adapters if asked), ``[B, 1+L, width]``."""
        return self._run_blocks(images, adapters, ())[0]

    def _run_blocks(self, images: Tensor, adapters: bool, keep: Sequence[int]) -> tuple[Tensor, dict[int, Tensor]]:
        """The block loop; also returns the batch-first output of each block in ``keep``."""
        visual = self.visual
        transformer = visual.transformer
        x = visual._embeds(images)
        if not transformer.batch_first:
            x = x.transpose(0, 1).contiguous()
        use = adapters and len(self.adapters) > 0
        slot = {b: k for k, b in enumerate(self.adapter_blocks)}
        n_adapted = len(self.adapter_blocks)
        checkpointing = transformer.grad_checkpointing and torch.is_grad_enabled()
        kept: dict[int, Tensor] = {}
        for i, blk in enumerate(transformer.resblocks):
            if use and i in slot:
                k = slot[i]
                fn, args = _adapted_block, (blk, x, self.adapters[k], self.adapters[n_adapted + k])
            else:
                fn, args = blk, (x,)
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
            else:
                x = fn(*args)
            if i in keep:
                kept[i] = x if transformer.batch_first else x.transpose(0, 1)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        return x, kept

    def encode_image(self, images: Tensor, adapters: bool = True) -> Tensor:
        """Projected class-token features ``[B, embed_dim]`` (not normalised).

        ``adapters=False`` ignores added adapters (the frozen CLIP feature).
        """
        x = self._visual_tokens(images, adapters)
        pooled, _ = self.visual._pool(x)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled

    def encode_image_blocks(self, images: Tensor, blocks: Sequence[int],
                            adapters: bool = True) -> tuple[Tensor, dict[int, Tensor]]:
        """``(cls [B, D], {l: H_l [B, 1+L, width]})``: the projected class token (exactly
        :meth:`encode_image`) and the residual stream after each block ``l`` in ``blocks``
        (batch-first, before ``ln_post``; negative indices count from the end). CAMS reads the
        last M blocks this way (docs/cams.md)."""
        n = len(self.visual.transformer.resblocks)
        bad = [int(b) for b in blocks if not -n <= int(b) < n]
        if bad:
            raise ValueError(f"block(s) {bad} out of range: {self.arch} has {n} visual blocks (0..{n - 1})")
        want = sorted({int(b) % n for b in blocks})
        x, kept = self._run_blocks(images, adapters, want)
        pooled, _ = self.visual._pool(x)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled, kept

    def encode_image_tokens(self, images: Tensor, adapters: bool = True) -> tuple[Tensor, Tensor]:
        """``(cls [B, D], patches [B, L, D])``: ``ln_post`` and ``proj`` applied to every token.

        This is the joint-space patch representation ClusPro/Troika and LaZSL use
        (docs/cluspro.md).
        """
        visual = self.visual
        if getattr(visual, "attn_pool", None) is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            raise ValueError(f"patch tokens are only defined for class-token ViTs; {self.arch} pools differently")
        x = visual.ln_post(self._visual_tokens(images, adapters))
        # The class token is projected on its own so that it is bit-identical to encode_image.
        cls, patches = x[:, 0], x[:, 1:]
        if visual.proj is not None:
            cls, patches = cls @ visual.proj, patches @ visual.proj
        return cls, patches

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (less memory for adapter training on ViT-L)."""
        self.model.set_grad_checkpointing(enable)

    # ---- text side -------------------------------------------------------------------------
    def _text_parts(self) -> dict[str, Any]:
        m = self.model
        tower = getattr(m, "text", None)
        if tower is not None:
            if not hasattr(tower, "token_embedding"):
                raise ValueError(f"{self.arch} has a non-CLIP text tower; soft prompts are not supported")
            m = tower
        return {
            "token_embedding": m.token_embedding,
            "positional_embedding": m.positional_embedding,
            "transformer": m.transformer,
            "ln_final": m.ln_final,
            "text_projection": m.text_projection,
            "attn_mask": m.attn_mask,
        }

    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None) -> Tensor:
        """Token ids ``[P, context_length]`` on the backbone's device.

        A prompt longer than the context is truncated and its last token set to EOT, so it keeps
        ``SOT ... EOT`` (docs/cluspro.md).
        """
        cl = self.context_length if context_length is None else int(context_length)
        if not 2 <= cl <= self.context_length:
            raise ValueError(f"context_length {cl} is out of range; {self.arch} accepts 2..{self.context_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(texts, context_length=cl).to(self.device)

    def eot_index(self, ids: Tensor) -> Tensor:
        """Position of the end-of-text token in each row of ``ids`` (``[P]``)."""
        eot = getattr(self.tokenizer, "eot_token_id", None)
        if eot is None:
            return ids.argmax(dim=-1)
        return (ids == eot).int().argmax(dim=-1)

    def token_embedding(self, ids: Tensor) -> Tensor:
        """Frozen CLIP word embeddings ``[..., text_width]`` of token ids."""
        return self._text_parts()["token_embedding"](ids)

    def encode_text_embeddings(self, embeddings: Tensor, eot_index: Tensor) -> Tensor:
        """Text features ``[P, embed_dim]`` from token embeddings ``[P, L, text_width]``.

        Adds the first L rows of the positional embedding, runs the text transformer with the
        L x L causal mask, applies ``ln_final`` and takes the projected output at ``eot_index``.
        With ``embeddings = token_embedding(ids)`` this equals open_clip's ``encode_text(ids)``;
        with L smaller than 77 it is CLIP with a truncated context (the repos' context length 8).
        """
        parts = self._text_parts()
        P, L, W = embeddings.shape
        if L > parts["positional_embedding"].shape[0]:
            raise ValueError(f"{L} text positions given but {self.arch} has {parts['positional_embedding'].shape[0]}")
        if W != self.text_width:
            raise ValueError(f"embeddings have width {W} but {self.arch}'s text width is {self.text_width}")
        if eot_index.shape != (P,):
            raise ValueError(f"eot_index has shape {tuple(eot_index.shape)}; pass one position per prompt ({P})")
        transformer = parts["transformer"]
        cast_dtype = transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype)
        x = x + parts["positional_embedding"][:L].to(cast_dtype)
        mask = parts["attn_mask"]
        x = transformer(x, attn_mask=None if mask is None else mask[:L, :L])
        x = parts["ln_final"](x)
        x = x[torch.arange(P, device=x.device), eot_index.to(x.device)]
        proj = parts["text_projection"]
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x

    def soft_prompt_embeddings(
        self,
        ids: Tensor,
        *,
        context: Tensor | None = None,
        slots: dict[int, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Token embeddings of ``ids`` ``[P, L]`` with learnable rows put in place.

        ``context`` ``[n_ctx, W]`` (shared) or ``[P, n_ctx, W]`` replaces positions ``1..n_ctx``
        (the prefix after SOT, e.g. "a photo of"). ``slots`` maps an offset relative to EOT to
        rows ``[P, W]``: ``{-2: attr_rows, -1: obj_rows}`` for the template "a photo of x x".
        Returns ``(embeddings [P, L, W], eot_index [P])`` for :meth:`encode_text_embeddings`.
        Gradients flow into ``context`` and the slot rows; the CLIP embeddings stay frozen.
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must be [P, L]; got shape {tuple(ids.shape)}")
        P, L = ids.shape
        eot = self.eot_index(ids)
        emb = self.token_embedding(ids)
        if context is None and not slots:
            return emb, eot
        emb = emb.clone()
        if context is not None:
            n_ctx = context.shape[-2]
            if n_ctx + 1 >= L:
                raise ValueError(f"{n_ctx} context tokens do not fit a context length of {L}")
            ctx = context.to(emb.dtype)
            emb[:, 1 : 1 + n_ctx] = ctx.expand(P, -1, -1) if ctx.dim() == 2 else ctx
        rows = torch.arange(P, device=emb.device)
        for offset, values in (slots or {}).items():
            pos = eot + int(offset)
            if bool((pos < 1).any()) or bool((pos >= L).any()):
                raise ValueError(f"slot offset {offset} relative to EOT falls outside the prompt")
            if values.shape != (P, emb.shape[-1]):
                raise ValueError(f"slot {offset} rows have shape {tuple(values.shape)}; expected ({P}, {emb.shape[-1]})")
            emb[rows, pos] = values.to(emb.dtype)
        return emb, eot

    def encode_text(
        self, texts: str | Sequence[str], context_length: int | None = None, normalize: bool = False
    ) -> Tensor:
        """Frozen CLIP text features ``[P, embed_dim]`` of plain strings."""
        ids = self.tokenize(texts, context_length)
        features = self.encode_text_embeddings(self.token_embedding(ids), self.eot_index(ids))
        return F.normalize(features, dim=-1) if normalize else features

    def word_embedding(self, words: Sequence[str]) -> Tensor:
        """Mean CLIP token embedding of each word's BPE tokens ``[len(words), W]`` (the CSP/Troika
        vocabulary initialisation; the caller cleans names first)."""
        ids = self.tokenize(list(words))
        emb = self.token_embedding(ids)
        eot = self.eot_index(ids)
        out = []
        for i in range(len(words)):
            if int(eot[i]) <= 1:
                raise ValueError(f"word {words[i]!r} has no tokens")
            out.append(emb[i, 1 : int(eot[i])].mean(dim=0))
        return torch.stack(out)

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, weights={self.weights_source!r}, device={self.device}, precision={self.precision}"
