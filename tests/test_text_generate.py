"""``czsl-bench text generate`` (czsl_bench.text_generate) with a tiny randomly initialised causal
language model and tokenizer built here (no download): the bank it writes, resuming a killed
generation to the same file, and the one-line errors for a missing extra or model."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from czsl_bench.cli import cli
from czsl_bench.text_bank import keep_sentence, load_text_bank
from fixtures.toy_world import ATTRS, OBJS, registered_toy_dataset

transformers = pytest.importorskip("transformers")
from czsl_bench.text_generate import (FEW_SHOT, GenerateSettings, TextGenerateError, completion_sentence,  # noqa: E402
                                      generate_bank, load_model, prompt_for)

WORDS = ("a photo of an image picture the red blue green circle square triangle rusty bicycle sliced bread "
         "wet dog ancient castle keywords output on with and is shiny round flat small").split()


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 1-layer, 16-wide GPT-2 with random weights and a word-level tokenizer, saved to a folder."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, ",": 3, ".": 4, ":": 5}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                               eos_token="[EOS]")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(vocab), n_positions=256, n_embd=16, n_layer=1, n_head=2,
        bos_token_id=2, eos_token_id=2, pad_token_id=1))
    folder = tmp_path_factory.mktemp("tiny-lm")
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    with registered_toy_dataset(tmp_path_factory.mktemp("toy-gen")) as root:
        yield root


PAIRS = [(a, o) for a in ATTRS for o in OBJS]
SMALL = dict(num_gen=3, batch_size=4, max_new_tokens=6, device="cpu")


def test_the_prompt_is_four_keyword_shots_then_the_pair():
    p = prompt_for("red", "circle", "photo")
    assert p.count("Keywords:") == 5 and p.count("Output:") == 5 and len(FEW_SHOT) == 4
    assert p.endswith("Keywords: red, circle, photo\nOutput:")
    assert completion_sentence(" A red circle.\nKeywords: x") == "A red circle."


def test_generate_writes_a_bank_of_every_pair_and_resumes_a_killed_run(tiny_lm, tmp_path):
    settings = GenerateSettings(model=str(tiny_lm), seed=3, **SMALL)
    loaded = load_model(str(tiny_lm), "cpu")
    full = tmp_path / "full.jsonl"
    summary = generate_bank(PAIRS, full, settings, loaded=loaded)
    assert summary == {"path": str(full), "pairs": 9, "generated": 9, "resumed": 0}
    bank = load_text_bank(full)
    assert set(bank.entries) == set(PAIRS)
    assert all(keep_sentence(t) for texts in bank.entries.values() for t in texts)  # cleaned
    assert all(len(texts) <= 3 and len(set(texts)) == len(texts) for texts in bank.entries.values())  # deduped

    # kill it after a few batches, tear the last line, resume: the same file as the uninterrupted run
    part = tmp_path / "part.jsonl"

    class Killed(Exception):
        pass

    calls = []

    def kill_after_three(done, total):
        calls.append(done)
        if len(calls) == 4:
            raise Killed

    with pytest.raises(Killed):
        generate_bank(PAIRS, part, settings, progress=kill_after_three, loaded=loaded)
    written = part.read_text().splitlines()
    assert 0 < len(written) < 9
    with open(part, "a") as fh:
        fh.write('{"attr": "red", "obj": "sq')  # killed in the middle of a line
    seen = []
    resumed = generate_bank(PAIRS, part, settings, progress=lambda d, t: seen.append((d, t)), loaded=loaded)
    assert resumed["resumed"] == len(written) and resumed["generated"] == 9 - len(written)
    assert seen[0] == (len(written) * 3, 27)  # the estimate starts from what was already there
    assert part.read_bytes() == full.read_bytes()
    assert generate_bank(PAIRS, part, settings, loaded=loaded)["generated"] == 0  # complete: nothing to do

    other = tmp_path / "other.jsonl"
    generate_bank(PAIRS, other, GenerateSettings(model=str(tiny_lm), seed=4, **SMALL), loaded=loaded)
    assert other.read_bytes() != full.read_bytes()  # the seed matters


def test_cli_generate_then_info(tiny_lm, toy, tmp_path):
    out = tmp_path / "bank.jsonl"
    runner = CliRunner()
    res = runner.invoke(cli, ["text", "generate", "toy", "--model", str(tiny_lm), "--out", str(out), "--num-gen", "2",
                              "--batch-size", "8", "--max-new-tokens", "5", "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert "9 pairs" in res.output and len(out.read_text().splitlines()) == 9
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:5]))  # as if killed after 5 pairs: the same command continues
    res = runner.invoke(cli, ["text", "generate", "toy", "--model", str(tiny_lm), "--out", str(out), "--num-gen", "2",
                              "--batch-size", "8", "--max-new-tokens", "5", "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert "5 already there, 4 generated" in res.output and out.read_text() == "".join(lines)
    res = runner.invoke(cli, ["text", "info", str(out), "--dataset", "toy", "--json"])
    assert res.exit_code == 0, res.output
    cov = json.loads(res.output)
    assert cov["lists"]["open world"]["pairs"] == 9 and cov["unknown_pairs"] == 0
    assert cov["lists"]["open world"]["covered"] + cov["lists"]["open world"]["fallback"] == 9


def test_a_missing_model_or_extra_is_one_line(tmp_path, monkeypatch, toy):
    runner = CliRunner()
    res = runner.invoke(cli, ["text", "generate", "toy", "--model", str(tmp_path / "no-such-model"), "-q",
                              "--out", str(tmp_path / "b.jsonl")])
    assert res.exit_code == 1
    assert "does not exist; download the model first" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    with pytest.raises(TextGenerateError, match=r"pip install 'czsl-bench\[text\]'"):
        load_model("facebook/opt-1.3b")
