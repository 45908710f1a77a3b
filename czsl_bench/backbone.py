"""Loading the one CLIP backbone: architectures, weights, devices and precision.

:func:`load_backbone` builds a :class:`~czsl_bench.clip_model.Backbone` (the model with its
adapters and soft-prompt text encoder lives in ``czsl_bench/clip_model.py``) from open_clip,
from the packaged embedded backbone, or from a checkpoint file.

Weights never go through an arbitrary unpickler: ``.safetensors`` files are read with
safetensors, everything else with ``torch.load(weights_only=True)``. OpenAI's released ``.pt``
files are TorchScript archives; those are opened with ``torch.jit.load`` only to read their
``state_dict()`` (TorchScript deserialisation runs no Python pickle code), and the scripted
program itself is never executed.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from czsl_bench.clip_model import Backbone

__all__ = [
    "Backbone",
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

