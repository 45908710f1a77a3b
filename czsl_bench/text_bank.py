"""Description banks: per-pair sentences read from JSON, JSON Lines or a PLID-style pickle.

A bank maps an (attribute, object) pair to a list of sentences that describe how that pair looks
(DCLIP/CuPL-style descriptors; the synthetic world ships one as ``descriptions.json``). Three
layouts are read:

* **JSON**: ``{"attr obj": ["sentence", ...], ...}`` (the synthetic world's format), or a list of
  JSON Lines-style records;
* **JSON Lines**: one object per line, ``{"attr": "a", "obj": "o", "texts": [...]}`` (``"pair":
  "a o"`` may replace ``attr``/``obj``; ``descriptions`` or ``sentences`` may replace ``texts``);
* **pickle** (PLID's text database): a dict ``{(attr, obj): [str, ...]}``. It is read with a
  restricted unpickler that resolves **no** global at all, so only plain containers, strings and
  numbers can come out of it: a pickle that names a class or a function (which is how pickles run
  code) is refused before anything is built.

Pairs without sentences get one fallback sentence (``"a photo of {attr} {obj}"`` by default); how
many did is counted, because coverage is information a method must report (a bank that only
describes feasible pairs tells an open-world scorer which pairs are feasible).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Pair = tuple[str, str]

DEFAULT_FALLBACK = "a photo of {attr} {obj}"
_TEXT_KEYS = ("texts", "descriptions", "sentences")
_PICKLE_SUFFIXES = (".pkl", ".pickle")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


class TextBankError(ValueError):
    """A bank file is missing, unreadable or not in one of the known layouts (one line)."""


@dataclass(frozen=True)
class TextBank:
    """Sentences per pair, plus where they came from (``path`` and ``sha256`` of the file)."""

    entries: dict[Pair, tuple[str, ...]]
    path: str | None = None
    sha256: str | None = None
    layout: str = "memory"

    def __len__(self) -> int:
        return len(self.entries)

    def texts(self, pair: Pair) -> tuple[str, ...]:
        return self.entries.get((pair[0], pair[1]), ())

    def describe(self) -> dict[str, Any]:
        """Provenance for a run record: path, content hash, layout, size."""
        return {"path": self.path, "sha256": self.sha256, "layout": self.layout, "pairs": len(self.entries),
                "sentences": sum(len(v) for v in self.entries.values())}


@dataclass
class PairTexts:
    """The sentences of every pair of a world, with the fallback accounted for."""

    texts: list[list[str]]
    fallback: list[bool]
    missing: list[Pair] = field(default_factory=list)

    @property
    def n_fallback(self) -> int:
        return sum(self.fallback)


def resolve_pair_texts(bank: TextBank | None, pairs: Sequence[Pair], fallback: str = DEFAULT_FALLBACK,
                       clean=lambda n: n, select=None) -> PairTexts:
    """Sentences for each pair of ``pairs``; pairs the bank lacks get ``fallback`` (one sentence).

    ``select`` filters a pair's sentences (default: drop blank ones); a pair left with none takes
    the fallback too, and is counted."""
    if "{attr}" not in fallback or "{obj}" not in fallback:
        raise TextBankError(f"fallback sentence {fallback!r} must contain {{attr}} and {{obj}}")
    select = select or (lambda found: [t for t in found if t.strip()])
    texts, used, missing = [], [], []
    for a, o in pairs:
        found = select(bank.texts((a, o))) if bank is not None else []
        if found:
            texts.append(found)
            used.append(False)
        else:
            texts.append([fallback.format(attr=clean(a), obj=clean(o))])
            used.append(True)
            missing.append((a, o))
    return PairTexts(texts, used, missing)


# ---------------------------------------------------------------------------------------------
# Cleaning (PLID's rules, docs/plid.md)
# ---------------------------------------------------------------------------------------------
MAX_WORDS = 20
MAX_WORD_CHARS = 30
MAX_CHARS = 128
MIN_CHARS = 5


def keep_sentence(text: str) -> bool:
    """PLID's filter: at least 5 and at most 128 characters, at most 20 words of at most 30
    characters each, and at least one letter (a sentence of digits or punctuation is noise)."""
    text = text.strip()
    words = text.split()
    return (MIN_CHARS <= len(text) <= MAX_CHARS and 0 < len(words) <= MAX_WORDS
            and all(len(w) <= MAX_WORD_CHARS for w in words) and any(c.isalpha() for c in text))


def clean_sentences(texts: Iterable[str]) -> list[str]:
    """The sentences that pass :func:`keep_sentence`, stripped, each kept once, in order."""
    out: dict[str, None] = {}
    for t in texts:
        t = " ".join(str(t).split())
        if keep_sentence(t):
            out.setdefault(t, None)
    return list(out)


def clean_pair_texts(bank: TextBank | None, pairs: Sequence[Pair], fallback: str = DEFAULT_FALLBACK,
                     clean=lambda n: n) -> PairTexts:
    """Like :func:`resolve_pair_texts`, after :func:`clean_sentences`: a pair whose sentences are
    all dropped takes the fallback sentence too (and is counted)."""
    return resolve_pair_texts(bank, pairs, fallback, clean, select=clean_sentences)


def bank_digest(bank: TextBank) -> str:
    """The bank's identity: the file's sha256, or (in memory) a hash of its sorted entries."""
    if bank.sha256:
        return bank.sha256
    h = hashlib.sha256()
    for (a, o) in sorted(bank.entries):
        h.update(json.dumps([a, o, list(bank.entries[(a, o)])], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def jsonl_line(pair: Pair, texts: Sequence[str]) -> str:
    """One JSON Lines record of a bank (what ``text generate`` appends per pair)."""
    return json.dumps({"attr": pair[0], "obj": pair[1], "texts": list(texts)}, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def load_text_bank(path: str | Path) -> TextBank:
    """Read a bank file (layout chosen by suffix; ``.json`` may also hold JSON Lines)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TextBankError(f"text bank {path} does not exist; pass a .json, .jsonl or .pkl description file")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    suffix = path.suffix.lower()
    if suffix in _PICKLE_SUFFIXES:
        entries, layout = _from_pickle(data, path), "pickle"
    elif suffix in _JSONL_SUFFIXES:
        entries, layout = _from_jsonl(data, path), "jsonl"
    else:
        try:
            raw = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise TextBankError(f"text bank {path} is not UTF-8 text; is it a pickle? name it .pkl") from None
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":  # several JSON values: JSON Lines under a .json name
                entries, layout = _from_jsonl(data, path), "jsonl"
                return TextBank(entries, str(path), digest, layout)
            raise TextBankError(f"text bank {path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                                "fix the file") from None
        entries, layout = _from_json_value(raw, path), "json"
    return TextBank(entries, str(path), digest, layout)


def bank_from_mapping(mapping: dict[Pair, Iterable[str]] | None, path: str | Path | None = None,
                      label: str | None = None) -> TextBank | None:
    """A bank from an in-memory ``{(attr, obj): [texts]}`` (e.g. ``CZSLDataset.descriptions``).

    ``path`` names the file it was read from, so the record can carry its content hash; ``label``
    is what the bank is called in records instead of that path (a dataset's own bank lives in a
    machine-specific cache: ``dataset:<name>/descriptions.json`` says the same on every machine)."""
    if mapping is None:
        return None
    entries = {(str(a), str(o)): tuple(str(t) for t in texts) for (a, o), texts in mapping.items()}
    digest = None
    if path is not None and Path(path).is_file():
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    name = label or (str(path) if path is not None else None)
    return TextBank(entries, name, digest, "json" if path else "memory")


def _pair_key(key: str, path: Path) -> Pair:
    fields = key.split()
    if len(fields) != 2:
        raise TextBankError(f"text bank {path}: key {key!r} must be '<attr> <obj>' (two names separated by a space)")
    return fields[0], fields[1]


def _sentences(value: Any, where: str, path: Path) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        raise TextBankError(f"text bank {path}: {where} must map to a list of strings, got {type(value).__name__}")
    return tuple(value)


def _add(entries: dict[Pair, tuple[str, ...]], pair: Pair, texts: tuple[str, ...]) -> None:
    # a pair named twice (JSON Lines written in several passes) keeps every sentence once
    old = entries.get(pair, ())
    entries[pair] = old + tuple(t for t in texts if t not in old)


def _from_record(rec: Any, where: str, path: Path) -> tuple[Pair, tuple[str, ...]]:
    if not isinstance(rec, dict):
        raise TextBankError(f"text bank {path}: {where} is a {type(rec).__name__}, expected an object "
                            '{"attr": ..., "obj": ..., "texts": [...]}')
    if "pair" in rec:
        pair = _pair_key(str(rec["pair"]), path)
    elif "attr" in rec and "obj" in rec:
        pair = (str(rec["attr"]), str(rec["obj"]))
    else:
        raise TextBankError(f"text bank {path}: {where} has no 'attr'/'obj' (or 'pair') field")
    key = next((k for k in _TEXT_KEYS if k in rec), None)
    if key is None:
        raise TextBankError(f"text bank {path}: {where} has no {'/'.join(_TEXT_KEYS)} field")
    return pair, _sentences(rec[key], where, path)


def _from_json_value(raw: Any, path: Path) -> dict[Pair, tuple[str, ...]]:
    entries: dict[Pair, tuple[str, ...]] = {}
    if isinstance(raw, dict):
        for key, value in raw.items():
            _add(entries, _pair_key(key, path), _sentences(value, f"entry {key!r}", path))
    elif isinstance(raw, list):
        for i, rec in enumerate(raw):
            _add(entries, *_from_record(rec, f"item {i}", path))
    else:
        raise TextBankError(f"text bank {path} must hold an object {{\"attr obj\": [texts]}} or a list of records")
    return entries


def _from_jsonl(data: bytes, path: Path) -> dict[Pair, tuple[str, ...]]:
    entries: dict[Pair, tuple[str, ...]] = {}
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise TextBankError(f"text bank {path} is not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TextBankError(f"text bank {path}: line {n} is not valid JSON ({exc.msg}); fix or delete it") from None
        _add(entries, *_from_record(rec, f"line {n}", path))
    return entries


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds only what pickle's own opcodes build (dicts, lists, tuples, str, numbers, bool, None).

    Everything else in a pickle (classes, functions, ``__reduce__`` payloads) reaches Python through
    ``find_class``; refusing every name there is what makes loading an untrusted file safe."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id: only plain data is allowed")


def _from_pickle(data: bytes, path: Path) -> dict[Pair, tuple[str, ...]]:
    try:
        raw = _PlainDataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise TextBankError(f"text bank {path} is not a plain-data pickle ({exc}); re-save it as "
                            "a dict of (attr, obj) -> list of str, or convert it to JSON") from None
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files raise many types
        raise TextBankError(f"text bank {path} cannot be unpickled ({type(exc).__name__}); is it a pickle?") from None
    if not isinstance(raw, dict):
        raise TextBankError(f"text bank {path}: the pickle holds a {type(raw).__name__}, expected a dict "
                            "(attr, obj) -> list of str")
    entries: dict[Pair, tuple[str, ...]] = {}
    for key, value in raw.items():
        if isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key):
            pair = (key[0], key[1])
        elif isinstance(key, str):
            pair = _pair_key(key, path)
        else:
            raise TextBankError(f"text bank {path}: key {key!r} is not an (attr, obj) tuple of strings")
        _add(entries, pair, _sentences(value, f"entry {key!r}", path))
    return entries


# ---------------------------------------------------------------------------------------------
# Coverage (``czsl-bench text info``)
# ---------------------------------------------------------------------------------------------
def coverage(bank: TextBank, dataset: Any) -> dict[str, Any]:
    """How much of ``dataset``'s pair lists the bank describes, per list, and what it has extra."""
    lists = {
        "train": list(dataset.train_pairs), "val": list(dataset.val_pairs), "test": list(dataset.test_pairs),
        "closed world": list(dataset.closed_pairs), "open world": list(dataset.open_pairs),
    }
    out: dict[str, Any] = {"bank": bank.describe(), "lists": {}}
    for name, pairs in lists.items():
        counts = [len(bank.texts(p)) for p in pairs]
        covered = [c for c in counts if c]
        out["lists"][name] = {
            "pairs": len(pairs), "covered": len(covered),
            "fallback": len(pairs) - len(covered),
            "sentences_min": min(covered) if covered else 0,
            "sentences_mean": sum(covered) / len(covered) if covered else 0.0,
            "sentences_max": max(covered) if covered else 0,
        }
    known = set(dataset.open_pairs)
    extra = [p for p in bank.entries if p not in known]
    out["unknown_pairs"] = len(extra)
    out["unknown_examples"] = [" ".join(p) for p in extra[:3]]
    return out


__all__ = ["TextBank", "TextBankError", "PairTexts", "DEFAULT_FALLBACK", "load_text_bank", "bank_from_mapping",
           "resolve_pair_texts", "clean_pair_texts", "clean_sentences", "keep_sentence", "bank_digest",
           "jsonl_line", "coverage"]


def bank_for(source: str, dataset: Any, fix: str = "pass --set text_bank=PATH") -> TextBank:
    """The description bank a method config names (``text_bank``): ``"dataset"`` is the dataset's
    own descriptions.json (the synthetic world ships one), anything else a bank file's path.

    Raises ``ValueError`` saying ``fix`` when the dataset ships no descriptions."""
    if source == "dataset":
        descriptions = getattr(dataset, "descriptions", None)
        if not descriptions:
            raise ValueError(f"{getattr(dataset, 'name', 'this dataset')} ships no descriptions.json; {fix}")
        path = Path(getattr(dataset, "root", ".")) / "descriptions.json"
        label = f"dataset:{getattr(dataset, 'name', '?')}/descriptions.json"
        return bank_from_mapping(descriptions, path if path.is_file() else None, label)
    return load_text_bank(source)
