"""VP-CMJL (Zhang et al., ICCV 2025): visual proxies and cross-modal joint learning (docs/vpcmjl.md).

The three-path base (``three_path.py``: adapters on every ViT block, three prompt prefixes, the
primitive vocabulary with whole-matrix dropout, one Linear-BN-ReLU-Dropout stage per primitive)
carries two classifiers over the same adapted image feature ``f``:

* **T (textual prototypes)**: composition ``s cos(f, t^c)``; attribute ``s cos(f^a_t, t^a) + s w^a``
  where ``f^a_t, w^a = AD-CA(f, raw T^a)`` (pre-LN cross-attention from the image to the attribute
  text features; ``w^a`` its head-averaged attention, the "attention score"); objects alike (OD-CA).
* **V (visual proxies)**: one learnable vector per attribute and object, initialised from the
  frozen CLIP text feature of the bare name; a composition's proxy is ``Linear([v^a; v^o])``;
  ``s cos(f, v^c)``, ``s cos(g_a(f), v^a)``, ``s cos(g_o(f), v^o)`` with ``g`` the disentanglers
  (AD-MLP / OD-MLP).

Loss: the six cross-entropies plus ``KL(softmax(z^c_t) || softmax(z^c_v))`` (target not detached,
as released). Score: ``z^b = alpha z^b_v + beta z^b_t``; ``z^c + softmax(z^a)_i + softmax(z^o)_j``
(probabilities added, as released). ``s`` is the frozen logit scale (100).

Variants (``--set variant=default|code``): ``code`` reproduces ``codefish12-09/VP_CMJL@74d7b22``:
the unused third cross-attention block ``com_ca`` registered (trainable by flag, never called),
model selection by the released loss rule (the last validation batch's loss divided by the number
of batches, lowest wins), and on C-GQA the two-slot primitive template. ``default`` drops
``com_ca`` and selects on validation AUC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from czsl_bench.methods.pair_scores import ImageSide, pair_scores
from czsl_bench.methods.three_path import (
    CONTEXT_LENGTH,
    BranchFeatures,
    ThreePathConfig,
    ThreePathMethod,
    VariantDefault,
    VStr,
)

PRIM_TEMPLATE = "a photo of x"
TWO_SLOT_TEMPLATE = "a photo of x x"
#: The ``validation_metrics`` key the ``code`` variant selects on (higher is better, so negated).
CODE_SELECT = "neg_last_batch_val_loss"
VARIANTS = ("default", "code")

# docs/vpcmjl.md "Defaults": the released configs/*.yml and the training script's hard-coded
# StepLR(3, 0.5); the synthetic row is the CPU-sized recipe the three-path methods share
_RECIPES: dict[str, dict[str, Any]] = {
    "mit-states": dict(epochs=15, batch_size=32, lr=5e-4, alpha=0.3, beta=0.7, val_loss_batch=64),
    "ut-zappos": dict(epochs=20, batch_size=16, lr=5e-4, alpha=0.7, beta=0.3, val_loss_batch=8),
    "cgqa": dict(epochs=20, batch_size=32, lr=5e-5, alpha=1.0, beta=1.0, val_loss_batch=16,
                 code_prim_template=TWO_SLOT_TEMPLATE),
}


@dataclass
class VPCMJLConfig(ThreePathConfig):
    """VP-CMJL settings. ``select_metric`` and ``prim_template`` follow ``variant`` unless set
    explicitly (``code``: the released loss rule and ``code_prim_template``)."""

    variant: Literal["default", "code"] = "default"
    alpha: float = 0.5  # inference weight of the V (proxy) logits
    beta: float = 0.5  # inference weight of the T (text) logits
    w_text: float = 1.0  # weight of the three T-branch cross-entropies
    w_proxy: float = 1.0  # weight of the three V-branch cross-entropies
    w_kl: float = 1.0  # weight of KL(T || V) on the composition distributions
    kl_detach: bool = False  # True: no gradient through the T-branch target of the KL
    attention_score: bool = True  # add s * w (AD-CA / OD-CA attention) to the T primitive logits
    combine: Literal["sum", "product"] = "sum"  # primitive term of the score: p_a + p_o (released) or p_a * p_o
    ca_heads: int = 16  # AD-CA / OD-CA heads (the largest divisor of the width not above this)
    val_loss_batch: int = 64  # the released eval batch: its last batch decides the code's selection
    code_prim_template: str = PRIM_TEMPLATE  # the released primitive prompt on this recipe
    prim_template: str = VStr(PRIM_TEMPLATE)
    select_metric: str = VStr("auc")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be 'default' or 'code', got {self.variant!r}")
        follow = {"select_metric": CODE_SELECT if self.variant == "code" else "auc",
                  "prim_template": self.code_prim_template if self.variant == "code" else PRIM_TEMPLATE}
        for name, value in follow.items():
            if isinstance(getattr(self, name), VariantDefault):
                setattr(self, name, VStr(value))
        for name in ("alpha", "beta", "w_text", "w_proxy", "w_kl"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("alpha and beta are both 0: the score would ignore the image; set one > 0")
        if self.ca_heads < 1 or self.val_loss_batch < 1:
            raise ValueError(f"ca_heads ({self.ca_heads}) and val_loss_batch ({self.val_loss_batch}) must be >= 1")
        if self.prim_template.split()[-1:] != ["x"] or self.code_prim_template.split()[-1:] != ["x"]:
            raise ValueError(f"primitive templates must end in the slot word 'x', got {self.prim_template!r}")

    @classmethod
    def defaults(cls, recipe: str) -> VPCMJLConfig:
        base = ThreePathConfig.common_defaults(recipe)
        if recipe == "synthetic":
            # the shared CPU recipe; alpha = beta = 0.5 keeps the composition logit at the scale
            # MIT-States and UT-Zappos use (alpha + beta = 1), no value was tuned on this world
            return cls(**base)
        base.update(weight_decay=1e-5, step_size=3, gamma=0.5, vocab_dropout=0.3, **_RECIPES[recipe])
        return cls(**base)


def _heads(dim: int, wanted: int) -> int:
    heads = min(wanted, dim)
    while dim % heads:
        heads -= 1
    return heads


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class PrimitiveCrossAttention(nn.Module):
    """AD-CA / OD-CA: the image feature attends over one primitive's raw text features.

    ``q = LN_q(f)``, ``kv = LN_kv(T)`` (one LayerNorm for keys and values), ``o, w = MHA(q, kv, kv)``
    with the ``B`` queries as one unbatched sequence (images never interact), ``x = f + o``,
    ``x = x + MLP(LN_2(x))`` (4x QuickGELU MLP, no dropout). Returns ``(x [B, D], w [B, N])`` with
    ``w`` the head-averaged attention probabilities (rows sum to 1).
    """

    def __init__(self, dim: int, heads: int = 16):
        super().__init__()
        self.ln_q = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, _heads(dim, heads), bias=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), QuickGELU(), nn.Linear(4 * dim, dim))

    def forward(self, f: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        kv = self.ln_kv(keys)
        o, w = self.attn(self.ln_q(f), kv, kv, need_weights=True, average_attn_weights=True)
        x = f + o
        return x + self.mlp(self.ln_2(x)), w


class VisualProxyHeads(nn.Module):
    """What VP-CMJL adds to the three-path model: AD-CA, OD-CA, the primitive proxies and the
    composition-proxy map (and, in ``code``, the never-called ``com_ca``)."""

    def __init__(self, attr_init: Tensor, obj_init: Tensor, heads: int = 16, com_ca: bool = False):
        super().__init__()
        dim = attr_init.shape[1]
        self.attr_ca = PrimitiveCrossAttention(dim, heads)
        self.obj_ca = PrimitiveCrossAttention(dim, heads)
        # the released model builds a third block that no forward calls (docs/vpcmjl.md): it only
        # adds trainable-by-flag parameters, kept for the parameter count of the code variant
        self.com_ca = PrimitiveCrossAttention(dim, heads) if com_ca else None
        self.attr_proxy = nn.Parameter(attr_init.detach().float().clone())
        self.obj_proxy = nn.Parameter(obj_init.detach().float().clone())
        self.comp_proxy = nn.Linear(2 * dim, dim)

    def composition_proxies(self, pair_attr: Tensor, pair_obj: Tensor) -> Tensor:
        """``v^c_ij = W_c [v^a_i ; v^o_j] + b_c`` for the given pairs ``[P, D]`` (not normalised)."""
        return self.comp_proxy(torch.cat([self.attr_proxy[pair_attr], self.obj_proxy[pair_obj]], dim=-1))


@dataclass
class Logits:
    """The six logits of one forward (docs/vpcmjl.md, "The six logits"); None where not needed."""

    comp_t: Tensor | None
    attr_t: Tensor | None
    obj_t: Tensor | None
    comp_v: Tensor | None
    attr_v: Tensor | None
    obj_v: Tensor | None
    attn_attr: Tensor | None = None  # w^a [B, |A|]
    attn_obj: Tensor | None = None


def kl_text_to_proxy(comp_t: Tensor, comp_v: Tensor, detach: bool = False) -> Tensor:
    """``KL(softmax(z^c_t) || softmax(z^c_v))`` averaged over the batch (``batchmean``); the
    released code does not detach the T-branch target."""
    target = comp_t.detach() if detach else comp_t
    return F.kl_div(F.log_softmax(comp_v, dim=-1), F.log_softmax(target, dim=-1), log_target=True,
                    reduction="batchmean")


class VPCMJL(ThreePathMethod):
    """VP-CMJL: the three-path base with cross-attended primitive features and visual proxies."""

    name = "vpcmjl"
    Config = VPCMJLConfig
    disentangler_stages = 1

    def extra_spec(self) -> dict:
        return dict(prim_template=str(self.config.prim_template))

    # -- prepare ---------------------------------------------------------------------------------
    def prepare(self, ctx) -> None:
        super().prepare(ctx)
        ds, bb = ctx.dataset, ctx.backbone
        with torch.no_grad():  # proxies start at the frozen text feature of the bare name
            attr_init = bb.encode_text([ctx.clean_name(a) for a in ds.attrs], context_length=CONTEXT_LENGTH)
            obj_init = bb.encode_text([ctx.clean_name(o) for o in ds.objs], context_length=CONTEXT_LENGTH)
        self.heads = VisualProxyHeads(attr_init.float(), obj_init.float(), self.config.ca_heads,
                                      com_ca=self.config.variant == "code").to(ctx.device)

    def modules(self) -> list[nn.Module]:
        return super().modules() + ([self.heads] if hasattr(self, "heads") else [])

    # -- the two branches ------------------------------------------------------------------------
    def logits(self, feats: BranchFeatures, text_raw: tuple[Tensor, Tensor, Tensor], pair_attr: Tensor,
               pair_obj: Tensor, text: bool = True, proxy: bool = True) -> Logits:
        """The T logits (``text``) and the V logits (``proxy``) over the given pairs."""
        s = self.model.logit_scale
        f = feats.image
        f_hat = F.normalize(f, dim=-1)
        out = Logits(None, None, None, None, None, None)
        if text:
            comp_raw, attr_raw, obj_raw = text_raw
            fa, out.attn_attr = self.heads.attr_ca(f, attr_raw)
            fo, out.attn_obj = self.heads.obj_ca(f, obj_raw)
            out.comp_t = s * f_hat @ F.normalize(comp_raw, dim=-1).T
            out.attr_t = s * F.normalize(fa, dim=-1) @ F.normalize(attr_raw, dim=-1).T
            out.obj_t = s * F.normalize(fo, dim=-1) @ F.normalize(obj_raw, dim=-1).T
            if self.config.attention_score:
                out.attr_t = out.attr_t + s * out.attn_attr
                out.obj_t = out.obj_t + s * out.attn_obj
        if proxy:
            heads = self.heads
            v_c = heads.composition_proxies(pair_attr, pair_obj)
            out.comp_v = s * f_hat @ F.normalize(v_c, dim=-1).T
            out.attr_v = s * F.normalize(feats.attr, dim=-1) @ F.normalize(heads.attr_proxy, dim=-1).T
            out.obj_v = s * F.normalize(feats.obj, dim=-1) @ F.normalize(heads.obj_proxy, dim=-1).T
        return out

    def loss(self, lg: Logits, y_pair: Tensor, y_attr: Tensor, y_obj: Tensor) -> Tensor:
        """``w_text (CE_c + CE_a + CE_o)_T + w_proxy (...)_V + w_kl KL``, each CE weighted by
        ``w_pair / w_attr / w_obj`` (all 1 as released)."""
        c = self.config
        total: Tensor | float = 0.0
        for weight, (zc, za, zo) in ((c.w_text, (lg.comp_t, lg.attr_t, lg.obj_t)),
                                     (c.w_proxy, (lg.comp_v, lg.attr_v, lg.obj_v))):
            if weight > 0:
                total = total + weight * (c.w_pair * F.cross_entropy(zc, y_pair) + c.w_attr * F.cross_entropy(za, y_attr)
                                          + c.w_obj * F.cross_entropy(zo, y_obj))
        if c.w_kl > 0:
            total = total + c.w_kl * kl_text_to_proxy(lg.comp_t, lg.comp_v, c.kl_detach)
        return total

    def _needs(self, training: bool) -> tuple[bool, bool]:
        """Which branches a forward must compute: training needs those with a loss weight (KL needs
        both), scoring those with an inference weight."""
        c = self.config
        if training:
            return c.w_text > 0 or c.w_kl > 0, c.w_proxy > 0 or c.w_kl > 0
        return c.beta > 0, c.alpha > 0

    # -- training --------------------------------------------------------------------------------
    def training_step(self, ctx, batch) -> Tensor:
        images, labels = batch[0], batch[1]
        y_pair, y_attr, y_obj = self.batch_targets(labels)
        text, proxy = self._needs(training=True)
        feats = self.model.image_features(images)
        raw = self.model.text_features(self.train_pair_attr, self.train_pair_obj, raw=True) if text else None
        lg = self.logits(feats, raw, self.train_pair_attr, self.train_pair_obj, text=text, proxy=proxy)
        return self.loss(lg, y_pair, y_attr, y_obj)

    # -- scoring ---------------------------------------------------------------------------------
    def combined(self, lg: Logits) -> tuple[Tensor, Tensor, Tensor]:
        """``z^b = alpha z^b_v + beta z^b_t`` for b = composition, attribute, object."""
        c = self.config
        parts = []
        for t, v in ((lg.comp_t, lg.comp_v), (lg.attr_t, lg.attr_v), (lg.obj_t, lg.obj_v)):
            z = 0.0
            if c.beta > 0:
                z = z + c.beta * t
            if c.alpha > 0:
                z = z + c.alpha * v
            parts.append(z)
        return parts[0], parts[1], parts[2]

    @torch.no_grad()
    def eval_bank(self, pair_attr: Tensor, pair_obj: Tensor, key: tuple | None = None) -> dict[str, Tensor]:
        """The image-independent side of scoring, once per evaluation: raw primitive text features
        (AD-CA / OD-CA keys), the primitive proxies, and the composition bank
        ``alpha v^c^ + beta t^c^`` whose product with ``s f^`` is the combined composition logit."""
        if key is not None and key in self._text_cache:
            return self._text_cache[key]
        model, c = self.model, self.config
        model.eval()
        self.heads.eval()
        text, proxy = self._needs(training=False)
        dim = self.heads.attr_proxy.shape[1]
        bank = torch.zeros(len(pair_attr), dim, device=pair_attr.device)
        out: dict[str, Tensor] = {}
        step = max(1, c.eval_text_batch)
        for i in range(0, len(pair_attr), step):
            pa, po = pair_attr[i : i + step], pair_obj[i : i + step]
            if text:
                comp_raw, attr_raw, obj_raw = model.text_features(pa, po, raw=True)
                out.setdefault("attr_raw", attr_raw)
                out.setdefault("obj_raw", obj_raw)
                bank[i : i + step] += c.beta * F.normalize(comp_raw, dim=-1)
            if proxy:
                bank[i : i + step] += c.alpha * F.normalize(self.heads.composition_proxies(pa, po), dim=-1)
        out["comp"] = bank
        if key is not None:
            self._text_cache = {key: out}
        return out

    @torch.no_grad()
    def image_side(self, images: Tensor, bank: dict[str, Tensor]) -> ImageSide:
        """Per image: the composition query ``s f^`` and the combined primitive probabilities."""
        text, proxy = self._needs(training=False)
        feats = self.model.image_features(images)
        lg = Logits(None, None, None, None, None, None)
        c, s = self.config, self.model.logit_scale
        za = zo = 0.0
        if text:
            f = feats.image
            fa, wa = self.heads.attr_ca(f, bank["attr_raw"])
            fo, wo = self.heads.obj_ca(f, bank["obj_raw"])
            lg.attr_t = s * F.normalize(fa, dim=-1) @ F.normalize(bank["attr_raw"], dim=-1).T
            lg.obj_t = s * F.normalize(fo, dim=-1) @ F.normalize(bank["obj_raw"], dim=-1).T
            if c.attention_score:
                lg.attr_t, lg.obj_t = lg.attr_t + s * wa, lg.obj_t + s * wo
            za, zo = c.beta * lg.attr_t, c.beta * lg.obj_t
        if proxy:
            za = za + c.alpha * s * F.normalize(feats.attr, dim=-1) @ F.normalize(self.heads.attr_proxy, dim=-1).T
            zo = zo + c.alpha * s * F.normalize(feats.obj, dim=-1) @ F.normalize(self.heads.obj_proxy, dim=-1).T
        return ImageSide(s * F.normalize(feats.image, dim=-1), za.softmax(-1), zo.softmax(-1))

    @torch.no_grad()
    def score(self, ctx, split):
        from torch.utils.data import DataLoader

        for module in self.modules():
            module.eval()
        pair_attr = split.pair_attr.to(ctx.device)
        pair_obj = split.pair_obj.to(ctx.device)
        bank = self.eval_bank(pair_attr, pair_obj, key=(split.name, split.world, len(split.pairs)))
        loader = DataLoader(split.dataset(ctx.backbone.preprocess_eval), batch_size=ctx.eval_batch_size,
                            shuffle=False, num_workers=ctx.num_workers)
        sides = []
        with ctx.progress.task(f"{self.name}: score {split.name}", total=len(loader)) as task:
            for images, _, _ in loader:
                sides.append(self.image_side(images.to(ctx.device), bank))
                task.advance()
        if not sides:
            return torch.empty(0, len(split.pairs))
        side = ImageSide(*(torch.cat(parts) for parts in zip(*((s.query, s.p_attr, s.p_obj) for s in sides))))
        return pair_scores(side, bank["comp"], pair_attr, pair_obj, self.config.combine)

    # -- the released model-selection rule -------------------------------------------------------
    @torch.no_grad()
    def validation_metrics(self, ctx, split) -> dict[str, float]:
        """``neg_last_batch_val_loss``: minus the released selection value, the training loss of the
        **last** validation batch (batches of ``val_loss_batch`` in split order) divided by the number
        of batches (the code overwrites its accumulator each batch, docs/vpcmjl.md). Targets: the
        image's pair among the split's pairs, its attribute and object; eval mode."""
        from torch.utils.data import DataLoader, Subset

        n = len(split)
        if n == 0:
            return {}
        size = self.config.val_loss_batch
        n_batches = math.ceil(n / size)
        last = list(range((n_batches - 1) * size, n))
        self.train_mode(False)
        loader = DataLoader(Subset(split.dataset(ctx.backbone.preprocess_eval), last), batch_size=len(last))
        images, labels, _ = next(iter(loader))
        labels = labels.to(ctx.device)
        pair_attr, pair_obj = split.pair_attr.to(ctx.device), split.pair_obj.to(ctx.device)
        text, proxy = self._needs(training=True)
        feats = self.model.image_features(images.to(ctx.device))
        raw = self.model.text_features(pair_attr, pair_obj, raw=True) if text else None
        lg = self.logits(feats, raw, pair_attr, pair_obj, text=text, proxy=proxy)
        loss = self.loss(lg, labels, pair_attr[labels], pair_obj[labels])
        return {CODE_SELECT: -float(loss) / n_batches}

    # -- ablations -------------------------------------------------------------------------------
    @classmethod
    def ablations(cls) -> dict[str, dict[str, Any]]:
        """docs/vpcmjl.md "Ablations": the paper's ablation tables could not be read, so these are
        the spec's suggested components, each switched off on its own, and the ``code`` variant."""
        return {
            "full": {},
            "text-only": {"alpha": 0.0, "w_proxy": 0.0, "w_kl": 0.0},
            "proxy-only": {"beta": 0.0, "w_text": 0.0, "w_kl": 0.0},
            "no-kl": {"w_kl": 0.0},
            "no-attention-score": {"attention_score": False},
            "product-combine": {"combine": "product"},
            "kl-detached": {"kl_detach": True},
            "code": {"variant": "code", "amp": False},  # the released code also trains in fp32
        }

