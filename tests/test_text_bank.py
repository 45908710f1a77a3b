"""Description banks (czsl_bench/text_bank.py): the three layouts, the restricted unpickler, the
fallback accounting and ``czsl-bench text info``."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from czsl_bench.cli import cli
from czsl_bench.text_bank import (TextBankError, bank_from_mapping, coverage, load_text_bank,
                                  resolve_pair_texts)
from fixtures.toy_world import ToyPlugin, registered_toy_dataset, write_toy_world

ENTRIES = {("red", "circle"): ["A red circle is a flat red disk."], ("blue", "square"): ["a blue square", "blue edges"]}


def test_json_jsonl_and_pickle_layouts_give_the_same_bank(tmp_path):
    as_json = tmp_path / "bank.json"
    as_json.write_text(json.dumps({f"{a} {o}": t for (a, o), t in ENTRIES.items()}))
    as_jsonl = tmp_path / "bank.jsonl"
    as_jsonl.write_text("\n".join(json.dumps({"attr": a, "obj": o, "texts": t}) for (a, o), t in ENTRIES.items()))
    as_pkl = tmp_path / "bank.pkl"
    as_pkl.write_bytes(pickle.dumps(ENTRIES))
    banks = [load_text_bank(p) for p in (as_json, as_jsonl, as_pkl)]
    for bank, layout, path in zip(banks, ("json", "jsonl", "pickle"), (as_json, as_jsonl, as_pkl)):
        assert bank.layout == layout
        assert bank.entries == {k: tuple(v) for k, v in ENTRIES.items()}
        assert bank.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert bank.describe()["sentences"] == 3


def test_jsonl_under_a_json_name_and_the_pair_field_are_read(tmp_path):
    path = tmp_path / "bank.json"
    path.write_text('{"pair": "red circle", "descriptions": ["x"]}\n{"pair": "red circle", "sentences": ["x", "y"]}\n')
    assert load_text_bank(path).texts(("red", "circle")) == ("x", "y")  # repeated pairs merge, no duplicates


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch SHOULD_NOT_EXIST",))


def test_a_pickle_that_would_run_code_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({("red", "circle"): [_Boom()]}))
    with pytest.raises(TextBankError, match="refusing to load posix.system|refusing to load os.system"):
        load_text_bank(path)
    assert not (tmp_path / "SHOULD_NOT_EXIST").exists()


@pytest.mark.parametrize("content, match", [
    ('{"red": ["x"]}', "must be '<attr> <obj>'"),
    ('{"red circle": [1, 2]}', "list of strings"),
    ('[1, 2', "not valid JSON"),
    ('[{"attr": "red", "obj": "circle"}]', "no texts/descriptions/sentences"),
])
def test_malformed_banks_fail_with_one_actionable_line(tmp_path, content, match):
    path = tmp_path / "bank.json"
    path.write_text(content)
    with pytest.raises(TextBankError, match=match) as info:
        load_text_bank(path)
    assert "\n" not in str(info.value)


def test_missing_and_non_dict_pickles_are_refused(tmp_path):
    with pytest.raises(TextBankError, match="does not exist"):
        load_text_bank(tmp_path / "nope.json")
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(TextBankError, match="expected a dict"):
        load_text_bank(path)


def test_fallback_sentences_are_counted_and_named():
    bank = bank_from_mapping(ENTRIES)
    pairs = [("red", "circle"), ("green", "square"), ("blue", "square")]
    out = resolve_pair_texts(bank, pairs)
    assert out.texts[0] == ["A red circle is a flat red disk."]
    assert out.texts[1] == ["a photo of green square"]
    assert out.fallback == [False, True, False] and out.n_fallback == 1 and out.missing == [("green", "square")]
    with pytest.raises(TextBankError, match="must contain"):
        resolve_pair_texts(bank, pairs, fallback="a photo")


def test_coverage_per_pair_list_and_the_text_info_command(tmp_path):
    root = write_toy_world(tmp_path / "toy")
    ds = ToyPlugin(root).load()
    bank = bank_from_mapping(ENTRIES | {("pink", "cube"): ["not in the world"]})
    cov = coverage(bank, ds)
    assert cov["lists"]["open world"] == {"pairs": 9, "covered": 2, "fallback": 7, "sentences_min": 1,
                                         "sentences_mean": 1.5, "sentences_max": 2}
    assert cov["lists"]["test"]["covered"] == 2  # red circle, blue square
    assert cov["unknown_pairs"] == 1 and cov["unknown_examples"] == ["pink cube"]

    path = tmp_path / "bank.json"
    path.write_text(json.dumps({f"{a} {o}": t for (a, o), t in ENTRIES.items()}))
    with registered_toy_dataset(root):
        result = CliRunner().invoke(cli, ["text", "info", str(path), "--dataset", "toy"])
        assert result.exit_code == 0, result.output
        assert "open world" in result.output and "2 / 9" in result.output
        assert hashlib.sha256(path.read_bytes()).hexdigest()[:12] in result.output
        as_json = CliRunner().invoke(cli, ["text", "info", str(path), "--dataset", "toy", "--json"])
        assert json.loads(as_json.output)["lists"]["closed world"]["covered"] == 2
        bad = CliRunner().invoke(cli, ["text", "info", str(tmp_path / "missing.json"), "--dataset", "toy"])
        assert bad.exit_code == 1 and "does not exist" in bad.output


def test_plid_cleaning_rules_and_the_fallback_count():
    from czsl_bench.text_bank import TextBank, bank_digest, clean_pair_texts, clean_sentences, keep_sentence

    long_word = "x" * 31
    assert keep_sentence("a red apple.") and not keep_sentence("tiny")  # under 5 characters
    assert not keep_sentence(" ".join(["word"] * 21))  # more than 20 words
    assert not keep_sentence(f"a {long_word} apple")  # a word over 30 characters
    assert not keep_sentence("a " * 60 + "apple")  # over 128 characters
    assert not keep_sentence("12345 67890 !!!")  # no letter
    assert clean_sentences(["  a red   apple. ", "a red apple.", "tiny", "a green apple"]) == ["a red apple.", "a green apple"]
    bank = TextBank({("red", "apple"): ("a red apple.",), ("old", "car"): ("!!!!!",)})
    out = clean_pair_texts(bank, [("red", "apple"), ("old", "car"), ("new", "car")], "a photo of {attr} {obj}.")
    assert out.texts == [["a red apple."], ["a photo of old car."], ["a photo of new car."]]
    assert out.n_fallback == 2 and out.missing == [("old", "car"), ("new", "car")]
    # an in-memory bank's identity is a hash of its entries, independent of their order
    other = TextBank({("old", "car"): ("!!!!!",), ("red", "apple"): ("a red apple.",)})
    assert bank_digest(bank) == bank_digest(other) != bank_digest(TextBank({("red", "apple"): ("a red apple",)}))


def test_a_datasets_own_bank_is_named_the_same_on_every_machine(tmp_path):
    """Records are committed: the bank of ``text_bank=dataset`` is named by dataset, not by the
    cache folder it happens to live in, and still carries the file's content hash."""
    from czsl_bench.text_bank import bank_for

    root = write_toy_world(tmp_path / "toy")
    (root / "descriptions.json").write_text('{"red circle": ["a red round disk"]}')
    ds = SimpleNamespace(name="toy", root=root, descriptions={("red", "circle"): ["a red round disk"]})
    bank = bank_for("dataset", ds)
    assert bank.path == "dataset:toy/descriptions.json" and str(tmp_path) not in bank.describe()["path"]
    assert bank.sha256 == hashlib.sha256((root / "descriptions.json").read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="ships no descriptions.json; pass a bank"):
        bank_for("dataset", SimpleNamespace(name="toy", root=root, descriptions=None), "pass a bank")
