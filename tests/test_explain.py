"""``czsl-bench explain`` (czsl_bench/explain.py): PNG + JSON for one image or a contact sheet, for
LaZSL (regions), the three-path methods (branch decomposition, ClusPro's prototypes), CLIP/CSP and
any method through the generic fallback; trained methods reuse the run's checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from czsl_bench import explain as ex
from czsl_bench.cli import cli
from czsl_bench.method import Method, NoConfig
from fixtures.toy_world import registered_toy_dataset

COMMON = ["--dataset", "toy", "--backbone", "czsl-tiny-vit", "--pretrained", "none", "-q"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    with registered_toy_dataset(tmp_path_factory.mktemp("toy-explain")) as root:
        yield root


def invoke(tmp_path, *args):
    result = CliRunner().invoke(cli, ["explain", *args, *COMMON, "--out", str(tmp_path / "out"),
                                      "--results-dir", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache")])
    return result


def sums_hold(expl):
    for entry in expl["top"]:
        if entry.get("contributions"):
            assert math.isclose(sum(c["contribution"] for c in entry["contributions"]), entry["score"], abs_tol=1e-4)


def test_lazsl_one_image_writes_a_png_and_the_same_numbers_as_json(toy, tmp_path):
    result = invoke(tmp_path, "lazsl", "--index", "1", "--set", "n_crops=5", "--top", "3")
    assert result.exit_code == 0, result.output
    png, js = tmp_path / "out" / "lazsl-toy-test-1.png", tmp_path / "out" / "lazsl-toy-test-1.json"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 1000
    expl = json.loads(js.read_text())
    assert expl["index"] == 1 and len(expl["top"]) == 3 and expl["method"] == "lazsl"
    sums_hold(expl)
    first = expl["top"][0]["contributions"][0]
    assert {"text", "group", "mass", "contribution", "region", "global", "top_crops", "plan", "heatmap"} <= set(first)
    assert len(first["top_crops"]) >= 1 and len(first["top_crops"][0]["box"]) == 4


def test_by_image_path_and_index_ranges_and_batch_mode(toy, tmp_path):
    from czsl_bench.api import load_dataset

    split = load_dataset("toy").split("test")
    result = invoke(tmp_path, "lazsl", "--image", split.images[3], "--set", "n_crops=4")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "lazsl-toy-test-3.png").is_file()
    result = invoke(tmp_path, "clip", "--index", "0-3")
    assert result.exit_code == 0, result.output
    sheet = json.loads((tmp_path / "out" / "clip-toy-test-sheet.json").read_text())
    assert [e["index"] for e in sheet] == [0, 1, 2, 3]
    result = invoke(tmp_path, "clip", "--n", "6")
    assert result.exit_code == 0, result.output
    sheet = json.loads((tmp_path / "out" / "clip-toy-test-sheet.json").read_text())
    assert len(sheet) == 6 and {e["true_seen"] for e in sheet} == {True, False}  # seen and unseen images
    with Image.open(tmp_path / "out" / "clip-toy-test-sheet.png") as im:
        assert im.format == "PNG"


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of"),
    (["--index", "0", "--n", "2"], "exactly one of"),
    (["--index", "99"], "indices must lie in 0-"),
    (["--index", "a-b"], "write N, A-B or A,B,C"),
    (["--image", "nope.png"], "is not an image of the test split"),
])
def test_bad_selections_are_usage_errors_in_one_line(toy, tmp_path, args, message):
    result = invoke(tmp_path, "clip", *args)
    assert result.exit_code == 2 and message in result.output


def test_deletion_needs_regions_and_reports_both_drops_for_lazsl(toy, tmp_path):
    bad = invoke(tmp_path, "clip", "--index", "0", "--deletion", "box")
    assert bad.exit_code == 1 and "no regions to delete" in bad.output
    for target in ("box", "window"):
        result = invoke(tmp_path, "lazsl", "--index", "0-1", "--deletion", target, "--set", "n_crops=3")
        assert result.exit_code == 0, result.output
        out = json.loads((tmp_path / "out" / f"lazsl-toy-test-deletion-{target}.json").read_text())
        assert out["images"] == 2 and len(out["rows"]) == 2 and out["target"] == target
        assert 0 < out["mean_area"] <= 1
    assert math.isclose(out["mean_difference"], out["mean_drop_explained"] - out["mean_drop_random"], abs_tol=1e-9)
    assert "explained region" in result.output


def test_a_trained_method_trains_once_then_explains_from_its_checkpoint(toy, tmp_path):
    args = ["csp", "--index", "2", "--set", "epochs=1", "--set", "batch_size=12"]
    first = invoke(tmp_path, *args)
    assert first.exit_code == 0, first.output
    # the run's own checkpoint folder: .checkpoints/<method>/<dataset>/<training fingerprint>/
    ckpts = list((tmp_path / "results" / ".checkpoints" / "csp" / "toy").glob("*/last.pt"))
    assert len(ckpts) == 1, ckpts
    ckpt = ckpts[0]
    stamp = ckpt.stat().st_mtime_ns
    one = json.loads((tmp_path / "out" / "csp-toy-test-2.json").read_text())
    second = invoke(tmp_path, *args)
    assert second.exit_code == 0, second.output
    assert ckpt.stat().st_mtime_ns == stamp  # restored, not retrained
    assert json.loads((tmp_path / "out" / "csp-toy-test-2.json").read_text())["top"] == one["top"]


@pytest.mark.slow
def test_three_path_decomposition_and_cluspro_prototypes(toy, tmp_path):
    for method in ("troika", "cluspro"):
        result = invoke(tmp_path, method, "--index", "4", "--set", "epochs=1", "--set", "batch_size=16")
        assert result.exit_code == 0, result.output
        expl = json.loads((tmp_path / "out" / f"{method}-toy-test-4.json").read_text())
        sums_hold(expl)
        parts = expl["top"][0]["contributions"]
        assert [p["group"] for p in parts] == ["pair", "attr x obj"]
        assert math.isclose(parts[1]["contribution"], expl["top"][0]["attr"]["prob"] * expl["top"][0]["obj"]["prob"],
                            rel_tol=1e-5)
    protos = expl["prototypes"]  # ClusPro: from the training state
    assert protos["attr"]["nearest"] and len(protos["attr"]["true"]["cosines"]) == 5
    assert all(-1.0001 <= n["cosine"] <= 1.0001 for n in protos["obj"]["nearest"])


class _Constant(Method):
    """A method without explain(): the generic fallback ranks its scores."""

    name = "constant"
    Config = NoConfig

    def score(self, ctx, split):
        return torch.arange(len(split.pairs), dtype=torch.float32).expand(len(split), -1).clone()


def test_methods_without_explain_get_the_generic_top_pairs(toy):
    from czsl_bench.api import load_dataset
    from czsl_bench.method import RunContext

    ds = load_dataset("toy")
    split = ds.split("test")
    ctx = RunContext("toy", ds, None, NoConfig(), seed=0)
    out = ex.explain_one(_Constant(), ctx, split, 0, top=2)
    cand = [j for j in range(len(split.pairs)) if split.candidate_mask[j]]
    assert [e["pair"] for e in out["top"]] == [" ".join(split.pairs[j]) for j in sorted(cand)[::-1][:2]]
    with pytest.raises(RuntimeError, match="sum to"):
        ex.check_contributions({"method": "m", "top": [{"pair": "a o", "score": 1.0,
                                                         "contributions": [{"contribution": 0.4}]}]})
