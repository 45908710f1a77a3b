"""The Troika-style three-path model (nn.Module) shared by Troika, ClusPro, the ClusPro base,
VP-CMJL and CAMS; their plugin base class is ``methods/three_path.py``.

Three recognition branches over one adapted CLIP (docs/cluspro.md, "The model"):

* **composition**: image feature ``f`` (adapted CLS token) against prompts
  ``[SOT] <prefix_c> <attr> <obj> [EOT]``;
* **attribute** / **object**: a primitive disentangler ``h^a(f)`` / ``h^o(f)`` against prompts
  ``[SOT] <prefix_a> <attr> [EOT]`` / ``[SOT] <prefix_o> <obj> [EOT]``.

Learnable parts: three independent 3-token prompt prefixes (initialised from "a photo of"), one
primitive vocabulary (|A| + |O| rows, each the mean CLIP token embedding of the name) with
vocabulary dropout, parallel bottleneck adapters on every ViT block (added through the backbone),
and the disentanglers: one Linear-BN-ReLU-Dropout(0.5) stage per primitive (Troika) or two stacked
stages (ClusPro, whose clustering reads the stage-1 output). Troika additionally has Cross-Modal
Traction (:class:`CrossModalTraction`), which makes the text features image-dependent.

Inference score (docs/cluspro.md, "The model"): ``s_c(x, (i, j)) + softmax(s_a)_i * softmax(s_o)_j`` where ``s_c`` is
the *raw* scaled composition logit, as the released code does (the paper writes p(c|x)).

The model talks to the backbone only through the contract of ``czsl_bench.backbone``
(``docs/architecture.md``): ``tokenize``, ``token_embedding``, ``encode_text_embeddings``,
``encode_image_tokens``, ``add_adapters`` and the frozen ``logit_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from czsl_bench.names import clean_name
from czsl_bench.text_memory import encode_text

PROMPT_INIT = "a photo of"
CONTEXT_LENGTH = 8


@dataclass(frozen=True)
class ThreePathSpec:
    """Architecture settings of the three-path model (the method configs carry these fields)."""

    n_ctx: int = 3  # prompt-prefix length: the tokens of "a photo of"
    context_length: int = CONTEXT_LENGTH
    vocab_dropout: float = 0.3  # nn.Dropout on the whole vocabulary matrix (0 on C-GQA)
    disentangler_stages: int = 2  # 1 = Troika, VP-CMJL; 2 = ClusPro; 0 = none (CAMS)
    disentangler_dropout: float = 0.5
    adapter_dim: int = 64
    adapter_dropout: float = 0.1
    adapter_scale: float = 0.1
    adapter_blocks: int = 0  # 0 = every ViT block; M > 0 = only the last M (CAMS)
    prim_template: str = "a photo of x"  # primitive prompt; its row goes at EOT-1 (docs/vpcmjl.md)
    attr_row: bool = True  # False: attribute prompts carry no attribute row (CAMS's code, docs/cams.md)
    cmt_layers: int = 0  # > 0 enables Troika's cross-modal traction
    cmt_dropout: float = 0.0
    cmt_init_lambda: float = 0.1


class Disentangler(nn.Module):
    """One primitive-adapter stage: Linear(D, D) -> BatchNorm1d -> ReLU -> Dropout(p)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.BatchNorm1d(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(F.relu(self.norm(self.linear(x))))

    def forward_frozen_stats(self, x: Tensor) -> Tensor:
        """The stage with running BatchNorm statistics and no dropout, leaving the running
        statistics untouched but still differentiable in the stage's weights. The ``paper``
        variant pushes prototypes through stage 2 this way (docs/cluspro.md, "Variants")."""
        y = F.batch_norm(self.linear(x), self.norm.running_mean, self.norm.running_var,
                         self.norm.weight, self.norm.bias, training=False, eps=self.norm.eps)
        return F.relu(y)


class _TractionLayer(nn.Module):
    """One CMT layer: ``q += proj(MHA(q, P, P))``; ``q += drop(MLP(LN(q)))`` (no LN before the
    attention; q/k/v without bias, output projection with bias; QuickGELU MLP 4x)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, q: Tensor, tokens: Tensor) -> Tensor:
        b, n, d = q.shape
        attn = F.scaled_dot_product_attention(
            self._split(self.q(q)), self._split(self.k(tokens)), self._split(self.v(tokens))
        )
        q = q + self.dropout(self.proj(attn.transpose(1, 2).reshape(b, n, d)))
        h = self.fc(self.norm(q))
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU, as in CLIP
        return q + self.dropout(self.out(h))


class CrossModalTraction(nn.Module):
    """Troika's CMT (docs/cluspro.md, "The model"): text features of a branch attend to the image's output tokens.

    ``forward(text [N, D], tokens [B, T, D], branch)`` returns image-dependent, L2-normalised text
    features ``[B, N, D]``: ``t' = normalize(t + lambda * q)`` with ``q`` the text features after
    the traction layers. The tokens are layer-normalised ``branch + 1`` times (Troika re-applies
    one LayerNorm cumulatively inside its branch loop; kept for fidelity).
    """

    def __init__(self, dim: int, layers: int, dropout: float, init_lambda: float):
        super().__init__()
        heads = max(1, dim // 64)
        while dim % heads:
            heads -= 1
        self.patch_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList([_TractionLayer(dim, heads, dropout) for _ in range(layers)])
        self.lamda = nn.Parameter(torch.full((dim,), float(init_lambda)))

    def forward(self, text: Tensor, tokens: Tensor, branch: int) -> Tensor:
        for _ in range(branch + 1):
            tokens = self.patch_norm(tokens)
        q = text.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, tokens)
        return F.normalize(text.unsqueeze(0) + self.lamda * q, dim=-1)


@dataclass
class BranchFeatures:
    """Image-side outputs of one forward pass."""

    image: Tensor  # f: adapted CLS feature [B, D]
    tokens: Tensor | None  # [B, 1 + L, D] output tokens (CLS first), only kept when CMT is on
    attr_stage1: Tensor  # h1^a(f) [B, D] (ClusPro clusters these)
    obj_stage1: Tensor
    attr: Tensor  # final attribute-branch feature [B, D]
    obj: Tensor


class ThreePathModel(nn.Module):
    """Prompts, vocabulary, disentanglers and (optionally) CMT over a backbone with adapters.

    The backbone is *not* a sub-module (its frozen weights stay out of this module's
    ``state_dict``); the adapters it creates are registered here as ``adapters`` so they are saved,
    counted and trained with the rest.
    """

    def __init__(self, backbone: Any, attrs: Sequence[str], objs: Sequence[str],
                 spec: ThreePathSpec = ThreePathSpec(), *, add_adapters: bool = True,
                 clean: Callable[[str], str] = clean_name):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)
        self.spec = spec
        self.n_attrs, self.n_objs = len(attrs), len(objs)
        if add_adapters and spec.adapter_dim > 0:
            blocks = None
            if spec.adapter_blocks:
                n_blocks = backbone.vision_layers
                if not 0 < spec.adapter_blocks <= n_blocks:
                    raise ValueError(f"adapter_blocks {spec.adapter_blocks} is out of range: {backbone.arch} "
                                     f"has {n_blocks} visual blocks (0 = all)")
                blocks = range(n_blocks - spec.adapter_blocks, n_blocks)
            backbone.add_adapters(bottleneck=spec.adapter_dim, dropout=spec.adapter_dropout,
                                  scale=spec.adapter_scale, blocks=blocks)
        # the backbone owns the adapter modules (its block loop calls them); registering the same
        # ModuleList here puts them in this model's parameters, state_dict and train/eval switch
        self.adapters = backbone.adapters if len(getattr(backbone, "adapters", ())) else None

        with torch.no_grad():
            init_ids = self._tokenize([PROMPT_INIT])
            init_emb = backbone.token_embedding(init_ids)[0, 1 : 1 + spec.n_ctx].float()
            self.prefix = nn.Parameter(init_emb.unsqueeze(0).repeat(3, 1, 1).clone())  # comp/attr/obj
            names = [clean(n) for n in list(attrs) + list(objs)]
            self.vocabulary = nn.Parameter(self._mean_name_embeddings(names))
            comp_ids = self._tokenize(["a photo of x x"])
            prim_ids = self._tokenize([spec.prim_template])
        self.register_buffer("comp_ids", comp_ids, persistent=False)
        self.register_buffer("prim_ids", prim_ids, persistent=False)
        self.register_buffer("comp_template", backbone.token_embedding(comp_ids).detach().float(),
                             persistent=False)
        self.register_buffer("prim_template", backbone.token_embedding(prim_ids).detach().float(),
                             persistent=False)
        self.comp_eot = int(backbone.eot_index(comp_ids)[0])
        self.prim_eot = int(backbone.eot_index(prim_ids)[0])
        self.vocab_dropout = nn.Dropout(spec.vocab_dropout)

        dim = int(backbone.embed_dim)
        if spec.disentangler_stages not in (0, 1, 2):
            raise ValueError(f"disentangler_stages must be 0, 1 or 2, got {spec.disentangler_stages}")
        if spec.disentangler_stages >= 1:
            self.attr_dis = Disentangler(dim, spec.disentangler_dropout)
            self.obj_dis = Disentangler(dim, spec.disentangler_dropout)
        if spec.disentangler_stages == 2:
            self.attr_dis2 = Disentangler(dim, spec.disentangler_dropout)
            self.obj_dis2 = Disentangler(dim, spec.disentangler_dropout)
        self.cmt = (CrossModalTraction(dim, spec.cmt_layers, spec.cmt_dropout, spec.cmt_init_lambda)
                    if spec.cmt_layers > 0 else None)

    # -- text side ----------------------------------------------------------------------------
    def _tokenize(self, texts: list[str]) -> Tensor:
        return self.backbone.tokenize(texts, context_length=self.spec.context_length)

    def _mean_name_embeddings(self, names: list[str]) -> Tensor:
        ids = self._tokenize(names)  # [n, L]: SOT, BPE tokens..., EOT, pad
        emb = self.backbone.token_embedding(ids).float()
        eot = self.backbone.eot_index(ids)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        inside = (pos >= 1) & (pos < eot[:, None])
        return (emb * inside[..., None]).sum(1) / inside.sum(1, keepdim=True).clamp_min(1)

    @property
    def logit_scale(self) -> float:
        return float(self.backbone.logit_scale)

    def _encode(self, template: Tensor, prefix: Tensor, slots: list[tuple[int, Tensor]], eot: int,
                normalize: bool = True, n: int | None = None) -> Tensor:
        n = slots[0][1].shape[0] if n is None else n
        emb = template.expand(n, -1, -1).clone()
        emb[:, 1 : 1 + self.spec.n_ctx] = prefix.to(emb.dtype)
        for position, rows in slots:
            emb[:, position] = rows.to(emb.dtype)
        eot_index = torch.full((n,), eot, dtype=torch.long, device=emb.device)
        # chunked / checkpointed under CZSL_TEXT_CHUNK / CZSL_TEXT_CHECKPOINT (memory only)
        out = encode_text(self.backbone, emb, eot_index).float()
        return F.normalize(out, dim=-1) if normalize else out

    def text_features(self, pair_attr: Tensor, pair_obj: Tensor, raw: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """L2-normalised text features ``(comp [P, D], attr [|A|, D], obj [|O|, D])`` for the
        given pairs (``raw=True``: before normalisation; VP-CMJL's cross-attention keys).
        Vocabulary dropout applies in training mode (one mask for all prompts)."""
        norm = not raw
        vocab = self.vocab_dropout(self.vocabulary)
        a_rows, o_rows = vocab[: self.n_attrs], vocab[self.n_attrs :]
        comp = self._encode(self.comp_template, self.prefix[0],
                            [(self.comp_eot - 2, a_rows[pair_attr]), (self.comp_eot - 1, o_rows[pair_obj])],
                            self.comp_eot, norm)
        if self.spec.attr_row:
            attr = self._encode(self.prim_template, self.prefix[1], [(self.prim_eot - 1, a_rows)], self.prim_eot, norm)
        else:  # the prefix and the template's literal token only: one prompt, the same for every attribute
            attr = self._encode(self.prim_template, self.prefix[1], [], self.prim_eot, norm, n=1).expand(self.n_attrs, -1)
        obj = self._encode(self.prim_template, self.prefix[2], [(self.prim_eot - 1, o_rows)], self.prim_eot, norm)
        return comp, attr, obj

    # -- image side ---------------------------------------------------------------------------
    def image_features(self, images: Tensor) -> BranchFeatures:
        cls, patches = self.backbone.encode_image_tokens(images)
        f = cls.float()
        tokens = torch.cat([f[:, None], patches.float()], 1) if self.cmt is not None else None
        if self.spec.disentangler_stages == 0:
            return BranchFeatures(f, tokens, f, f, f, f)
        a1, o1 = self.attr_dis(f), self.obj_dis(f)
        if self.spec.disentangler_stages == 2:
            a, o = self.attr_dis2(a1), self.obj_dis2(o1)
        else:
            a, o = a1, o1
        return BranchFeatures(f, tokens, a1, o1, a, o)

    # -- logits and score ---------------------------------------------------------------------
    def branch_logits(self, feats: BranchFeatures, text: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Scaled cosine logits ``(s_c [B, P], s_a [B, |A|], s_o [B, |O|])``."""
        scale = self.logit_scale
        out = []
        for branch, (img, txt) in enumerate(zip((feats.image, feats.attr, feats.obj), text)):
            img = F.normalize(img, dim=-1)
            if self.cmt is None:
                out.append(scale * img @ txt.T)
            else:
                txt_b = self.cmt(txt, feats.tokens, branch)  # [B, N, D]
                out.append(scale * torch.einsum("bd,bnd->bn", img, txt_b))
        return out[0], out[1], out[2]

    @staticmethod
    def combine(s_c: Tensor, s_a: Tensor, s_o: Tensor, pair_attr: Tensor, pair_obj: Tensor) -> Tensor:
        """``s_c + softmax(s_a)[attr] * softmax(s_o)[obj]`` (raw composition logit, docs/cluspro.md "The model")."""
        return s_c + s_a.softmax(-1)[:, pair_attr] * s_o.softmax(-1)[:, pair_obj]

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def format_millions(n: int) -> str:
    """``8742912 -> '8.74 M'`` (how the paper's Table 10 states parameter counts)."""
    return f"{n / 1e6:.2f} M"


__all__ = [
    "ThreePathSpec", "ThreePathModel", "Disentangler", "CrossModalTraction", "BranchFeatures",
    "format_millions", "PROMPT_INIT", "CONTEXT_LENGTH",
]
