"""One CLIP backbone for every method: open_clip loading, adapters, soft-prompt text encoder.

Everything here wraps open_clip's own modules (no fork of its code). The visual block loop is
re-run here so that parallel bottleneck adapters (docs/cluspro.md) can read each block's
un-normalised input; with the adapters at their zero initialisation the loop computes exactly
the operations of open_clip's ``ResidualAttentionBlock.forward`` in the same order, so the
features are bit-identical to the plain model (tested).

All CLIP weights are frozen after loading (``requires_grad=False``), including the token and
positional embeddings and the logit scale; a method that wants to train a part of CLIP says so
with :meth:`Backbone.unfreeze`. The CLIP modules always run in eval mode (they hold no dropout
or batch norm in the ViT configs used here); ``Backbone.train()`` switches only the adapters.

Weights never go through an arbitrary unpickler: ``.safetensors`` files are read with
safetensors, everything else with ``torch.load(weights_only=True)``. OpenAI's released ``.pt``
files are TorchScript archives; those are opened with ``torch.jit.load`` only to read their
``state_dict()`` (TorchScript deserialisation runs no Python pickle code), and the scripted
program itself is never executed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from czsl_bench.hashing import tensors_sha256

__all__ = [
    "Backbone",
    "BottleneckAdapter",
    "DEFAULT_ARCH",
    "DEFAULT_PRETRAINED",
    "DEVICE_CHOICES",
    "PRECISION_CHOICES",
    "WeightsUnavailableError",
    "load_backbone",
    "packaged_backbone_dir",
    "read_checkpoint",
    "register_packaged_configs",
    "resolve_device",
    "resolve_precision",
]

log = logging.getLogger(__name__)

DEFAULT_ARCH = "ViT-L-14-quickgelu"
DEFAULT_PRETRAINED = "openai"
DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", "fp32", "bf16")
_NO_WEIGHTS = {None, "", "none", "random"}
# Keys that OpenAI's checkpoints carry beside the weights; open_clip's CLIP has no slot for them.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_HOW_TO_PASS = (
    "pass a local checkpoint instead: --pretrained /path/to/file "
    "(.pt/.bin/.safetensors, OpenAI or open_clip format)"
)


class WeightsUnavailableError(OSError):
    """Pretrained weights could not be obtained (no network, missing file, unknown tag).

    An ``OSError`` so that the CLI prints the message as one line (exit code 1).
    """


# --------------------------------------------------------------------------------------------
# device and precision


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch sees no CUDA GPU; use --device cpu or auto")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICE_CHOICES)}")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> bf16 autocast on CUDA, fp32 on CPU. Weights always stay fp32 (AMP style)."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISION_CHOICES)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("precision 'bf16' needs a CUDA device; on CPU the backbone runs in fp32")
    return precision


# --------------------------------------------------------------------------------------------
# packaged configs and weights (czsl_bench/data/backbones/)


def packaged_backbone_dir() -> Path:
    """Directory of the model configs and weights that ship with the package."""
    return Path(__file__).resolve().parent / "data" / "backbones"


_registered_dirs: set[str] = set()


def register_packaged_configs(directory: str | Path | None = None) -> None:
    """Make the open_clip model configs (``*.json``) in ``directory`` known to open_clip.

    Defaults to the packaged ``czsl_bench/data/backbones``. Idempotent and cheap after the
    first call. JSON files that are not model configs are ignored by open_clip's scan.
    """
    import open_clip

    directory = Path(directory) if directory is not None else packaged_backbone_dir()
    key = str(directory.resolve())
    if key in _registered_dirs or not directory.is_dir():
        return
    if any(directory.glob("*.json")):
        open_clip.add_model_config(directory)
    _registered_dirs.add(key)


def _packaged_weights(arch: str, tag: str) -> Path | None:
    """A packaged checkpoint for ``arch``/``tag``: ``<arch>-<tag>.safetensors`` (or ``.`` / ``_``
    as separator), or ``<arch>.safetensors``, inside the packaged backbone directory."""
    directory = packaged_backbone_dir()
    names = [f"{arch}{sep}{tag}.safetensors" for sep in ("-", ".", "_")] + [f"{arch}.safetensors"]
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


def _has_packaged_config(arch: str) -> bool:
    return (packaged_backbone_dir() / f"{arch}.json").is_file()


# --------------------------------------------------------------------------------------------
# reading checkpoints safely


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """Read a CLIP checkpoint file into a flat ``{name: tensor}`` state dict on the CPU.

    Accepts safetensors, ``torch.save`` state dicts (plain, or an open_clip training checkpoint
    with a ``state_dict`` entry and optional ``module.`` prefixes) and OpenAI TorchScript
    archives. Returns ``(state_dict, format)`` with format ``"openai-jit"``, ``"openai"`` (an
    OpenAI state dict, recognised by its extra ``input_resolution`` entry) or ``"open_clip"``.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"checkpoint file {str(path)!r} does not exist; {_HOW_TO_PASS}")
    fmt = "open_clip"
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        elif _is_torchscript_archive(path):
            # OpenAI's released ViT-*.pt files. Only the tensors are read out; the program is never run.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                obj = torch.jit.load(str(path), map_location="cpu").state_dict()
            fmt = "openai-jit"
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except WeightsUnavailableError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported as one line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"cannot read checkpoint {str(path)!r} ({first_line[:200]}); expected a .safetensors file, a "
            "torch.save state dict readable with weights_only=True, or an OpenAI TorchScript .pt"
        ) from None

    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # open_clip training checkpoint: {'epoch', 'name', 'state_dict', ...}
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if fmt == "open_clip" and "input_resolution" in state:
        fmt = "openai"
    return state, fmt


def _fit_state_dict(model: nn.Module, state: dict[str, Tensor], source: str, arch: str) -> None:
    """Load ``state`` into ``model`` strictly, with a one-line error that names what does not fit."""
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    # Non-persistent buffers (the text causal mask) are rebuilt by the model; a TorchScript
    # archive's state_dict() carries them anyway.
    transient = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    state = {k: v for k, v in state.items() if k not in _OPENAI_EXTRA_KEYS and k not in transient}
    if hasattr(model, "text"):  # CustomTextCLIP keeps the text tower under `text.`
        state = convert_to_custom_text_state_dict(state)
    elif any(k.startswith("text.") for k in state):
        state = {k.removeprefix("text."): v for k, v in state.items()}
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            parts.append(f"{len(mismatched)} with another shape (e.g. {mismatched[0]})")
        raise ValueError(
            f"checkpoint {source} does not fit architecture {arch!r}: {'; '.join(parts)} keys; "
            "pass the --backbone the checkpoint was made for"
        )
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------
# downloading by tag


def _hub_reachable(host: str = "huggingface.co") -> bool:
    """Fast offline check so that a machine without network fails at once, not after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # name resolution goes through the proxy; let the hub client try
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _cached_hub_file(pcfg: dict, cache_dir: str | None) -> str | None:
    """The tag's file if the hub client already has it locally (no network needed)."""
    hub = pcfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    model_id, filename = os.path.split(hub)
    names = ["open_clip_model.safetensors", filename or "open_clip_pytorch_model.bin"]
    for name in names:
        try:
            return hf_hub_download(model_id, name, cache_dir=cache_dir, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached under this name
            continue
    return None


def _download_tag(arch: str, tag: str, pcfg: dict, cache_dir: str | None) -> str:
    import open_clip

    cached = _cached_hub_file(pcfg, cache_dir)
    if cached:
        return cached
    unavailable = (
        f"pretrained weights {tag!r} for {arch} are not available here and cannot be downloaded"
    )
    if pcfg.get("hf_hub") and not _hub_reachable():
        raise WeightsUnavailableError(f"{unavailable} (no network); {_HOW_TO_PASS}")
    # open_clip and huggingface_hub log every retry at WARNING/ERROR; the user gets our one line.
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        path = open_clip.pretrained.download_pretrained(pcfg, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - hub and network errors become one line
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailableError(f"{unavailable} ({reason}); {_HOW_TO_PASS}") from None
    finally:
        logging.disable(previous)
    if not path or not Path(path).is_file():
        raise WeightsUnavailableError(f"{unavailable}; {_HOW_TO_PASS}")
    return path


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


# --------------------------------------------------------------------------------------------
# loading


def _known_arch(arch: str) -> bool:
    import open_clip

    return arch in open_clip.list_models()


def load_backbone(
    arch: str = DEFAULT_ARCH,
    pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
    device: str | torch.device = "auto",
    precision: str = "auto",
    cache_dir: str | None = None,
) -> Backbone:
    """Build the open_clip model ``arch`` and load its weights, frozen.

    ``pretrained``: ``None`` / ``"none"`` for random weights; an open_clip tag such as
    ``"openai"`` (downloaded by open_clip's hub client into ``cache_dir``); a packaged tag
    (``"synthetic"`` for ``czsl-tiny-vit``); or a local ``.pt`` / ``.bin`` / ``.safetensors``
    file in OpenAI (TorchScript or state dict) or open_clip format. Unavailable weights raise
    :class:`WeightsUnavailableError` with one line that says how to pass a local file.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    register_packaged_configs()
    if not _known_arch(arch):
        names = open_clip.list_models()
        close = [n for n in names if n.lower().startswith(arch.lower().split("-")[0])][:6]
        raise ValueError(
            f"unknown architecture {arch!r}; try one of {close or names[:6]} (open_clip.list_models() lists all)"
        )
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    cfg = open_clip.get_model_config(arch) or {}
    arch_quick_gelu = bool(cfg.get("quick_gelu", False))

    tag = None if pretrained is None else str(pretrained)
    state: dict[str, Tensor] | None = None
    pp_overlay: dict = {}
    if tag is not None and tag.lower() in _NO_WEIGHTS:
        tag = None
    if tag is None:
        source = "random"
    elif open_clip.get_pretrained_cfg(arch, tag):
        pcfg = open_clip.get_pretrained_cfg(arch, tag)
        if bool(pcfg.get("quick_gelu", False)) != arch_quick_gelu:
            fix = f"{arch}-quickgelu" if not arch_quick_gelu else arch.removesuffix("-quickgelu")
            raise ValueError(
                f"weights {tag!r} were trained with {'QuickGELU' if not arch_quick_gelu else 'GELU'} but {arch!r} "
                f"uses the other activation; use --backbone {fix}"
            )
        path = _download_tag(arch, tag, pcfg, cache_dir)
        state, fmt = read_checkpoint(path)
        source = f"{tag} ({Path(path).name})"
        pp_overlay = {k: v for k, v in pcfg.items() if k in asdict(PreprocessCfg())}
    elif _has_packaged_config(arch) and not Path(tag).is_file():
        path = _packaged_weights(arch, tag)
        if path is None:
            raise WeightsUnavailableError(
                f"packaged weights {tag!r} for {arch} are missing from {packaged_backbone_dir().name}/; "
                f"reinstall czsl-bench or {_HOW_TO_PASS}"
            )
        state, fmt = read_checkpoint(path)
        source = f"{tag} ({path.name})"
    elif Path(tag).expanduser().is_file():
        path = Path(tag).expanduser()
        state, fmt = read_checkpoint(path)
        if fmt.startswith("openai") and not arch_quick_gelu:
            raise ValueError(
                f"{path.name} is an OpenAI checkpoint (QuickGELU) but {arch!r} uses GELU; use --backbone {arch}-quickgelu"
            )
        source = str(path)
    else:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise WeightsUnavailableError(
            f"pretrained {tag!r} is neither a file nor a known tag for {arch} "
            f"(tags: {', '.join(tags) or 'none'}); {_HOW_TO_PASS}"
        )

    # open_clip logs a warning for every model built without weights; the weights come next.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
    finally:
        logging.disable(previous)
    if state is not None:
        _fit_state_dict(model, state, source, arch)
    preprocess_cfg = merge_preprocess_dict(model.visual.preprocess_cfg, pp_overlay)
    model = model.to(dev)
    backbone = Backbone(
        model,
        arch=arch,
        pretrained=tag,
        weights_source=source,
        device=dev,
        precision=prec,
        preprocess_cfg=preprocess_cfg,
    )
    return backbone.eval()  # adapters added later follow the mode; call .train() to train them

