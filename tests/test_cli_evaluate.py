"""`czsl-bench evaluate` on saved score files."""

import json

import torch
from click.testing import CliRunner

from czsl_bench.cli import cli
from czsl_bench.evaluation import evaluate

from test_evaluator_golden import GT, PAIR_ATTR, PAIR_OBJ, SCORES, SEEN


class NotPlain:  # a pickled object that is not plain data: must never be unpickled
    pass


def test_evaluate_file_matches_api(tmp_path):
    f = tmp_path / "scores.pt"
    torch.save({"scores": SCORES, "gt_pair": GT, "seen_mask": SEEN, "pair_attr": PAIR_ATTR,
                "pair_obj": PAIR_OBJ}, f)
    res = CliRunner().invoke(cli, ["evaluate", str(f), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["auc"] == evaluate(SCORES, GT, SEEN, None, PAIR_ATTR, PAIR_OBJ).auc == 0.75
    assert out["protocol"].startswith("czsl-legacy-20bin")


def test_evaluate_safetensors_open_world(tmp_path):
    from safetensors.torch import save_file

    f, ff = tmp_path / "s.safetensors", tmp_path / "feas.pt"
    save_file({"scores": SCORES, "gt_pair": GT, "seen_mask": SEEN}, str(f))
    torch.save({"feasibility": torch.tensor([0.0, 0.0, 0.6])}, ff)
    res = CliRunner().invoke(cli, ["evaluate", str(f), "--feasibility", str(ff), "--threshold", "0.5", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["threshold"] == 0.5


def test_evaluate_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"scores": SCORES}, bad)
    res = CliRunner().invoke(cli, ["evaluate", str(bad)])
    assert res.exit_code == 1 and "missing key(s) gt_pair, seen_mask" in res.output

    evil = tmp_path / "evil.pt"
    torch.save({"scores": NotPlain()}, evil)
    res = CliRunner().invoke(cli, ["evaluate", str(evil)])
    assert res.exit_code == 1 and "arbitrary pickles are never loaded" in res.output

    nan = tmp_path / "nan.pt"
    s = SCORES.clone()
    s[0, 0] = float("nan")
    torch.save({"scores": s, "gt_pair": GT, "seen_mask": SEEN}, nan)
    res = CliRunner().invoke(cli, ["evaluate", str(nan)])
    assert res.exit_code == 1 and "NaN/inf" in res.output and "Traceback" not in res.output

    f = tmp_path / "ok.pt"
    torch.save({"scores": SCORES, "gt_pair": GT, "seen_mask": SEEN}, f)
    res = CliRunner().invoke(cli, ["evaluate", str(f), "--feasibility", str(f)])
    assert res.exit_code == 2 and "--threshold" in res.output
