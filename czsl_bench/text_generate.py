"""Description banks written by a local causal language model (``czsl-bench text generate``).

PLID's recipe (spec-baselines §4.3): for every pair, ``num_gen`` sampled completions of a few-shot
keyword prompt (four "Keywords: ... / Output: ..." examples, then ``Keywords: <attr>, <obj>,
<photo|image|picture>``), ``max_new_tokens=32``, ``no_repeat_ngram_size=2``; duplicates and
sentences under 5 characters dropped, then PLID's cleaning rules (czsl_bench.text_bank). The
few-shot examples below are this project's own. PLID's configs use OPT-1.3B, the default here.

The output is a JSON Lines bank, one line per pair, written when the pair is complete, so a
killed generation continues where it stopped: the jobs (pair, sample) are cut into fixed batches
and batch ``b`` is sampled under a seed derived from ``(seed, b)``, so a resumed run produces the
same sentences as an uninterrupted one (on the same machine and library versions).

Needs Hugging Face ``transformers`` (``pip install 'czsl-bench[text]'``); imported only here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from czsl_bench.text_bank import clean_sentences, jsonl_line

DEFAULT_MODEL = "facebook/opt-1.3b"
NOUNS = ("photo", "image", "picture")

# Four worked examples in PLID's keyword -> sentence format (written for this project).
FEW_SHOT = (
    ("rusty, bicycle, photo", "A photo of a rusty bicycle leaning against a brick wall."),
    ("sliced, bread, image", "An image of sliced bread on a wooden cutting board."),
    ("wet, dog, picture", "A picture of a wet dog shaking water off its fur on the beach."),
    ("ancient, castle, photo", "A photo of an ancient castle with crumbling stone towers on a hill."),
)


class TextGenerateError(RuntimeError):
    """A missing extra or model, or an unusable output file (one line)."""


@dataclass(frozen=True)
class GenerateSettings:
    model: str = DEFAULT_MODEL
    num_gen: int = 64
    batch_size: int = 64
    max_new_tokens: int = 32
    no_repeat_ngram_size: int = 2
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0
    device: str = "auto"


def prompt_for(attr: str, obj: str, noun: str) -> str:
    """The few-shot keyword prompt for one pair (names already cleaned)."""
    shots = "".join(f"Keywords: {k}\nOutput: {o}\n" for k, o in FEW_SHOT)
    return f"{shots}Keywords: {attr}, {obj}, {noun}\nOutput:"


def completion_sentence(text: str) -> str:
    """The generated sentence: the completion up to its first line break."""
    return text.strip().split("\n", 1)[0].strip()


def _batch_seed(seed: int, batch: int) -> int:
    digest = hashlib.sha256(f"czsl-bench text generate\t{int(seed)}\t{int(batch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _noun(seed: int, pair: tuple[str, str], k: int) -> str:
    digest = hashlib.sha256(f"{int(seed)}\t{pair[0]}\t{pair[1]}\t{k}".encode()).digest()
    return NOUNS[digest[0] % len(NOUNS)]


def done_pairs(path: Path) -> dict[tuple[str, str], list[str]]:
    """Pairs already in a (possibly killed) output file; a torn last line is cut off the file."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    good_end = data.rfind(b"\n") + 1
    out: dict[tuple[str, str], list[str]] = {}
    for n, line in enumerate(data[:good_end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out[(str(rec["attr"]), str(rec["obj"]))] = list(rec["texts"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TextGenerateError(f"{path}: line {n} is not a bank record; pass another --out or delete it") from None
    if good_end < len(data):  # the process was killed while writing a line
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    return out


def load_model(name: str, device: str = "auto") -> tuple[Any, Any, Any]:
    """``(tokenizer, model, torch.device)``; one clear line for a missing extra or model."""
    try:
        import transformers
    except ImportError:
        raise TextGenerateError("text generate needs Hugging Face transformers: pip install 'czsl-bench[text]'") from None
    import torch

    local = Path(name).expanduser()
    if not local.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise TextGenerateError(
            f"model folder {name} does not exist; download the model first, e.g. "
            f"`huggingface-cli download {DEFAULT_MODEL} --local-dir opt-1.3b`, and pass --model opt-1.3b")
    source = str(local) if local.exists() else name
    try:
        tok = transformers.AutoTokenizer.from_pretrained(source)
        model = transformers.AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TextGenerateError(
            f"cannot load model {name!r} ({first[:160]}); download it first, e.g. "
            f"`huggingface-cli download {DEFAULT_MODEL} --local-dir opt-1.3b`, and pass --model opt-1.3b") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    model.to(dev).eval()
    tok.padding_side = "left"  # a decoder-only model continues the prompt's last token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok, model, dev


def generate_bank(pairs: Sequence[tuple[str, str]], out: str | os.PathLike, settings: GenerateSettings,
                  clean: Callable[[str], str] = lambda n: n,
                  progress: Callable[[int, int], None] | None = None,
                  loaded: tuple[Any, Any, Any] | None = None) -> dict[str, Any]:
    """Write (or complete) a JSON Lines bank of ``pairs`` at ``out``; returns a summary.

    ``progress(done, total)`` is called with generated samples (already-written pairs count as
    done from the start, so an estimate of the remaining time is right after a resume)."""
    import torch

    s = settings
    if s.num_gen < 1 or s.batch_size < 1:
        raise TextGenerateError(f"num_gen and batch_size must be >= 1, got {s.num_gen}, {s.batch_size}")
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    have = done_pairs(out)
    pairs = [(str(a), str(o)) for a, o in pairs]
    todo = [i for i, p in enumerate(pairs) if p not in have]
    total = len(pairs) * s.num_gen
    if progress:
        progress(total - len(todo) * s.num_gen, total)
    if not todo:
        return {"path": str(out), "pairs": len(pairs), "generated": 0, "resumed": len(have)}
    tok, model, dev = loaded if loaded is not None else load_model(s.model, s.device)

    jobs = [(i, k) for i in range(len(pairs)) for k in range(s.num_gen)]
    first = todo[0] * s.num_gen
    pending: dict[int, list[str]] = {}
    written = 0
    with open(out, "a", encoding="utf-8") as fh:
        for b in range(first // s.batch_size, (len(jobs) + s.batch_size - 1) // s.batch_size):
            batch = jobs[b * s.batch_size:(b + 1) * s.batch_size]
            need = [(i, k) for i, k in batch if pairs[i] not in have]
            if not need:
                continue
            prompts = [prompt_for(clean(pairs[i][0]), clean(pairs[i][1]), _noun(s.seed, pairs[i], k)) for i, k in batch]
            enc = tok(prompts, return_tensors="pt", padding=True).to(dev)
            gen = torch.Generator(device="cpu").manual_seed(_batch_seed(s.seed, b))
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
                with torch.no_grad():
                    ids = model.generate(**enc, do_sample=True, max_new_tokens=s.max_new_tokens,
                                         no_repeat_ngram_size=s.no_repeat_ngram_size, temperature=s.temperature,
                                         top_k=s.top_k, top_p=s.top_p, pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for (i, _), text in zip(batch, texts):
                if pairs[i] in have:
                    continue
                pending.setdefault(i, []).append(completion_sentence(text))
                if len(pending[i]) == s.num_gen:
                    fh.write(jsonl_line(pairs[i], clean_sentences(pending.pop(i))) + "\n")
                    fh.flush()
                    written += 1
            if progress:
                progress(min(total, (b + 1) * s.batch_size), total)
    return {"path": str(out), "pairs": len(pairs), "generated": written, "resumed": len(have)}


__all__ = ["DEFAULT_MODEL", "FEW_SHOT", "GenerateSettings", "TextGenerateError", "generate_bank", "prompt_for",
           "completion_sentence", "done_pairs", "load_model"]
