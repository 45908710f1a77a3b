"""Fault injection for inputs and writers (issue #12): every bad input is one line naming what,
where and how to fix it, never a traceback; every file is written atomically with the umask's
permissions; a full disk says so and leaves nothing behind."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from czsl_bench.cli import cli
from czsl_bench.records import RunRecord, write_record
from fixtures.records import make_identity, make_run_record


def _record(seed: int = 0, auc: float = 0.2) -> RunRecord:
    return make_run_record("csp", "synthetic", "closed", seed,
                           {"val": {"auc": auc}, "test": {"auc": auc, "best_hm": auc, "best_seen": auc,
                                                          "best_unseen": auc}})


def _one_line_error(result, code: int | tuple[int, ...] = (1, 2)) -> str:
    """The CLI failed the way a person can act on: an error exit code, no traceback, one line."""
    codes = (code,) if isinstance(code, int) else code
    assert result.exit_code in codes, (result.exit_code, result.output)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# ----------------------------------------------------------------------------------------------
# writers: permissions follow the umask, a full disk is one line and no partial file
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _toy_trainer_run(tmp_path, epochs: int = 1):
    from test_training import ToyConfig, ToyMethod, _ctx, _validate

    from czsl_bench.training import Trainer

    method = ToyMethod(ToyConfig(epochs=epochs, batch_size=16, lr=0.05))
    ctx = _ctx(0)
    method.prepare(ctx)
    Trainer(seed=0, validate=_validate, checkpoint_dir=tmp_path).fit(method, ctx)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_every_writer_honours_the_umask(tmp_path, mask):
    from czsl_bench.cache import FeatureCache

    expected = 0o666 & ~mask
    with _umask(mask):
        record = write_record(_record(), tmp_path / "results")
        res = CliRunner().invoke(cli, ["table", "--results-dir", str(tmp_path / "results"),
                                       "--output", str(tmp_path / "table.md")])
        assert res.exit_code == 0, res.output
        cache = FeatureCache(tmp_path / "cache")
        entry = cache.put(cache.key(kind="test"), {"x": torch.zeros(3)})
        _toy_trainer_run(tmp_path / "ckpt")
    for path in (record, tmp_path / "table.md", entry, tmp_path / "ckpt" / "last.pt"):
        assert _mode(path) == expected, (path, oct(_mode(path)), oct(expected))


def test_ablation_plot_honours_the_umask(tmp_path):
    from czsl_bench.methods.cluspro import ClusPro
    from czsl_bench.plots import ablation_sweep_figure

    records = [make_run_record("cluspro", "synthetic", "closed", s, {"test": {"auc": 0.1 + k / 100}},
                               variant=f"k-{k}", overrides={"n_prototypes": k}) for k in (1, 3) for s in range(2)]
    with _umask(0o022):
        out = ablation_sweep_figure(records, "cluspro", "synthetic", ClusPro.ablation_sweeps(), tmp_path / "p.png")
    assert _mode(out) == 0o644


class _FullDisk(io.RawIOBase):
    """A file on a disk with ``room`` bytes left: then every write fails with ENOSPC."""

    def __init__(self, raw, room: int):
        self.raw, self.room = raw, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.raw.write(data)

    def fileno(self):
        return self.raw.fileno()

    def close(self):
        self.raw.close()
        super().close()


def _disk_with(monkeypatch, room: int) -> None:
    """Every atomic write from now on gets a file object that runs out of space after ``room`` bytes."""
    from czsl_bench import atomic

    real = atomic._fdopen

    def fdopen(fd, mode, encoding=None):
        buffered = io.BufferedWriter(_FullDisk(real(fd, "wb", buffering=0), room))
        return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding=encoding or "utf-8")

    monkeypatch.setattr(atomic, "_fdopen", fdopen)


def test_checkpoint_on_a_full_disk_says_disk_full_and_leaves_no_partial_file(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    _disk_with(monkeypatch, 200)
    from czsl_bench.atomic import DiskFullError

    with pytest.raises(DiskFullError) as info:
        _toy_trainer_run(ckpt)
    message = str(info.value)
    assert message.startswith("disk full") and str(ckpt) in message, message
    assert "\n" not in message and "unexpected pos" not in message
    assert info.value.errno == errno.ENOSPC
    assert list(ckpt.iterdir()) == []  # neither last.pt nor a temp file


def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    target.write_text("old")
    _disk_with(monkeypatch, 3)
    from czsl_bench.atomic import atomic_write_bytes

    with pytest.raises(OSError, match=r"^disk full: could not write r\.json in .*free space"):
        atomic_write_bytes(target, b"new contents")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_table_output_on_a_full_disk_is_one_cli_line(tmp_path, monkeypatch):
    write_record(_record(), tmp_path)
    _disk_with(monkeypatch, 10)
    res = CliRunner().invoke(cli, ["table", "--results-dir", str(tmp_path), "--output", str(tmp_path / "t.md")])
    line = _one_line_error(res, 1)
    assert "disk full" in line and str(tmp_path) in line, line
    assert not (tmp_path / "t.md").exists() and not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------
# records: a deeply nested JSON file is one unreadable record, not a crash
# ----------------------------------------------------------------------------------------------
DEEP = "[" * 200_000


def test_deeply_nested_record_is_skipped_by_table(tmp_path):
    good = write_record(_record(seed=0, auc=0.25), tmp_path)
    deep = good.with_name("seed1.json")
    deep.write_text(DEEP)
    res = CliRunner().invoke(cli, ["table", "--results-dir", str(tmp_path), "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "RecursionError" not in res.output
    assert f"skipping {deep}: not a record: JSON nested too deeply to read" in res.output
    assert "25.0" in res.output  # the readable record still makes the table


def test_deeply_nested_record_counts_as_unfinished_for_skip_existing(tmp_path):
    from czsl_bench.records import RecordError, find_existing, load_records, read_record, record_path

    ident = make_identity("csp", "synthetic", "closed", 0)
    deep = record_path(tmp_path, ident)
    deep.parent.mkdir(parents=True)
    deep.write_text('{"schema_version": 1, "config": ' + DEEP)
    assert find_existing(tmp_path, ident) is None
    with pytest.raises(RecordError, match=r"seed0\.json: not a record: JSON nested too deeply to read$"):
        read_record(deep)
    reasons = []
    assert load_records(tmp_path, on_error=lambda p, why: reasons.append(why)) == []
    assert reasons == ["not a record: JSON nested too deeply to read"]


def test_skip_existing_sweep_reruns_over_a_deeply_nested_record(tmp_path):
    from fixtures.toy_world import registered_toy_dataset

    from czsl_bench.records import read_record, record_path

    with registered_toy_dataset(tmp_path / "toy"):
        results = tmp_path / "results"
        # the path of the run's record (it depends on method, dataset, backbone, setting and seed only)
        deep = record_path(results, make_identity("clip", "toy", "closed", 0,
                                                  backbone={"arch": "czsl-tiny-vit", "pretrained": None}))
        deep.parent.mkdir(parents=True)
        deep.write_text(DEEP)
        res = CliRunner().invoke(cli, ["run", "clip", "--dataset", "toy", "--seed", "0,1", "--skip-existing",
                                       "--backbone", "czsl-tiny-vit", "--pretrained", "none", "-q",
                                       "--results-dir", str(results), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    assert "2/2 runs ok" in res.output
    assert read_record(deep).seed == 0  # the damaged file was replaced by a real record


# ----------------------------------------------------------------------------------------------
# `czsl-bench evaluate` and the evaluator API: bad input is one line
# ----------------------------------------------------------------------------------------------
def _golden():
    """The hand-derived problem of test_evaluator_golden (AUC 0.75): 4 images, 3 pairs."""
    scores = torch.tensor([[5.0, 3.0, 4.0], [2.0, 6.0, 1.0], [3.0, 1.0, 2.5], [1.0, 2.0, 4.0]])
    return {"scores": scores, "gt_pair": torch.tensor([0, 1, 2, 2]), "seen_mask": torch.tensor([True, True, False])}


def _evaluate_file(tmp_path, data, *args):
    f = tmp_path / "scores.pt"
    torch.save(data, f)
    return CliRunner().invoke(cli, ["evaluate", str(f), *args])


def test_evaluate_refuses_complex_scores(tmp_path):
    data = _golden()
    data["scores"] = data["scores"].to(torch.complex64) + 1j  # the imaginary part used to vanish
    line = _one_line_error(_evaluate_file(tmp_path, data), 1)
    assert "scores are complex" in line and "real" in line


@pytest.mark.parametrize("key, value", [
    ("scores", "abc"), ("scores", [[1.0, 2.0, 3.0]] * 4), ("gt_pair", "0,1,2,2"), ("gt_pair", [0, 1, 2, 2]),
    ("seen_mask", [True, True, False]), ("candidate_mask", 3), ("pair_attr", "x"),
])
def test_evaluate_refuses_non_tensor_entries(tmp_path, key, value):
    data = _golden()
    data[key] = value
    if key == "pair_attr":
        data["pair_obj"] = torch.tensor([0, 0, 1])
    line = _one_line_error(_evaluate_file(tmp_path, data), 1)
    assert f"{key!r} is a {type(value).__name__}, not a tensor" in line and "scores.pt" in line


@pytest.mark.parametrize("threshold", ["nan", "inf", "-inf", "NaN", "abc"])
def test_evaluate_refuses_a_non_finite_threshold(tmp_path, threshold):
    feas = tmp_path / "feas.pt"
    torch.save({"feasibility": torch.tensor([0.0, 0.0, 0.6])}, feas)
    res = _evaluate_file(tmp_path, _golden(), "--feasibility", str(feas), "--threshold", threshold)
    line = _one_line_error(res, 2)
    assert "--threshold" in line and "number" in line


def test_evaluate_refuses_a_0d_label_tensor(tmp_path):
    data = _golden()
    data["gt_pair"] = torch.tensor(2)
    assert "gt_pair" in _one_line_error(_evaluate_file(tmp_path, data), 1)
    feas = tmp_path / "feas.pt"
    torch.save({"feasibility": torch.tensor([0.0, 0.0, 0.6])}, feas)
    line = _one_line_error(_evaluate_file(tmp_path, data, "--feasibility", str(feas), "--threshold", "0.5"), 1)
    assert "gt_pair must be a 1-D vector" in line


@pytest.mark.parametrize("scores, match", [
    (torch.ones(4, 3, dtype=torch.complex64), r"scores.* are complex"),
    (torch.ones(4, 3, dtype=torch.bool), r"scores.* are boolean"),
    ("abc", "scores is a str"),
    ([[1.0, 2.0], [3.0]], "scores cannot be read as a numeric array|score blocks must be"),
    (np.array([["a", "b", "c"]] * 4, dtype=object),
     "scores cannot be read as a numeric array|score blocks must be"),
])
def test_evaluate_api_validates_scores(scores, match):
    from czsl_bench.evaluation import evaluate, evaluate_dense, evaluate_stream

    g = _golden()
    for fn in (evaluate, evaluate_dense, evaluate_stream):
        with pytest.raises(ValueError, match=match):
            fn(scores, g["gt_pair"], g["seen_mask"], n_pairs=3) if fn is evaluate_stream else \
                fn(scores, g["gt_pair"], g["seen_mask"])


def test_evaluate_api_validates_labels_and_threshold():
    from czsl_bench.evaluation import evaluate, evaluate_stream
    from czsl_bench.evaluation.feasibility import evaluate_open_world

    g = _golden()
    with pytest.raises(ValueError, match="gt_pair is a str"):
        evaluate(g["scores"], "0123", g["seen_mask"])
    with pytest.raises(ValueError, match="gt_pair must hold integer indices"):
        evaluate(g["scores"], g["gt_pair"].to(torch.complex64), g["seen_mask"])
    with pytest.raises(ValueError, match="seen_mask must be boolean"):
        evaluate(g["scores"], g["gt_pair"], torch.tensor([1, 1, 0], dtype=torch.complex64))
    with pytest.raises(ValueError, match="gt_pair must be a 1-D vector"):
        evaluate_stream(g["scores"], 2, g["seen_mask"])
    feas = torch.tensor([0.0, 0.0, 0.6])
    for bad in (float("nan"), float("inf"), "0.5"):
        with pytest.raises(ValueError, match="threshold .* is not a finite number"):
            evaluate_open_world(g["scores"], g["gt_pair"], g["seen_mask"], feas, bad)
    with pytest.raises(ValueError, match="feasibility are complex"):
        evaluate_open_world(g["scores"], g["gt_pair"], g["seen_mask"], feas.to(torch.complex64), 0.5)


# ----------------------------------------------------------------------------------------------
# `--set`, `--threshold`: refused before any run starts
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _no_runs():
    """`czsl-bench run` up to the point where runs would start; each "run" returns nothing."""
    from czsl_bench import api

    calls = []

    def execute(spec, opts):
        calls.append(spec)
        return api.Outcome(spec)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "execute", execute)
        yield calls


def _run(*args):
    return CliRunner().invoke(cli, ["run", *args, "-q"])


def _float_fields(config_cls):
    from czsl_bench.config import _field_types

    return [k for k, tp in _field_types(config_cls).items() if tp is float]


@pytest.mark.parametrize("method", ["coop", "csp", "troika", "cluspro", "cluspro-base"])  # clip has none
def test_every_float_field_refuses_nan_and_inf(method):
    from czsl_bench.config import ConfigError, parse_overrides
    from czsl_bench.registry import METHODS

    cls = METHODS.get(method).Config
    assert len(_float_fields(cls)) >= 5
    for key in _float_fields(cls):
        for bad in ("nan", "inf", "-inf", "1e999"):
            with pytest.raises(ConfigError, match=rf"^{key}: expected a finite float, got '{bad}'$"):
                parse_overrides([f"{key}={bad}"], cls)


@pytest.mark.parametrize("setting, match", [
    ("max_grad_norm=nan", "max_grad_norm: expected a finite float, got 'nan'"),
    ("lr=inf", "lr: expected a finite float, got 'inf'"),
    ("score_block=0", "score_block must be >= 1, got 0"),
    ("text_batch_size=-3", "text_batch_size must be >= 1, got -3"),
    ("batch_size=0", "batch_size must be >= 1, got 0"),
    ("attr_dropout=1.5e999", "attr_dropout: expected a finite float"),
])
def test_run_refuses_bad_values_up_front(setting, match):
    with _no_runs() as calls:
        res = _run("csp", "--dataset", "synthetic", "--set", setting)
    assert match in _one_line_error(res, 2)
    assert calls == []  # not one run started


def test_run_refuses_bad_values_from_a_config_file_up_front(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"max_grad_norm": NaN}')  # Python's json reads NaN
    with _no_runs() as calls:
        res = _run("csp", "--dataset", "synthetic", "--config", str(cfg))
    assert "max_grad_norm: expected a finite float" in _one_line_error(res, 2) and calls == []


def test_score_block_zero_for_clip_fails_before_scoring():
    with _no_runs() as calls:
        res = _run("clip", "--dataset", "synthetic", "--set", "score_block=0")
    assert "score_block must be >= 1, got 0" in _one_line_error(res, 2) and calls == []


@pytest.mark.parametrize("threshold", ["nan", "inf", "-inf"])
def test_run_refuses_a_non_finite_threshold(threshold):
    with _no_runs() as calls:
        res = _run("csp", "--dataset", "synthetic", "--setting", "open", "--threshold", threshold)
    assert "--threshold" in _one_line_error(res, 2) and calls == []


def test_python_api_refuses_bad_values_before_running():
    import czsl_bench
    from czsl_bench.config import ConfigError
    from czsl_bench.method import TrainConfig

    with pytest.raises(ValueError, match="threshold nan is not a finite number"):
        czsl_bench.run("clip", "synthetic", setting="open", threshold=float("nan"), write=False)
    with pytest.raises(ConfigError, match="max_grad_norm: expected a finite float"):
        TrainConfig(max_grad_norm=float("nan"))
    with pytest.raises(ConfigError, match="val_every must be >= 1, got 0"):
        TrainConfig(val_every=0)


# ----------------------------------------------------------------------------------------------
# --seed: instant one-line usage errors, the valid range stated
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed, match", [
    ("5-2", "seed range '5-2' is empty (LOW > HIGH); write it as 2-5"),
    ("12345678901234567890", "seed 12345678901234567890 is too large; seeds are integers in [0, 4294967295]"),
    ("4294967296", "is too large"),
    ("9" * 5000, "(5000 digits) is too large"),
    ("0-100000", "seed range '0-100000' has 100001 seeds, more than 1000 in one call"),
    ("0-99999999999999999999999", "is too large"),
    ("1_000", "seed '1_000' is not an integer"),
    ("٣", "seed '٣' is not an integer"),
])
def test_bad_seeds_are_instant_usage_errors(seed, match):
    import time

    started = time.perf_counter()
    with _no_runs() as calls:
        res = _run("clip", "--dataset", "synthetic", "--seed", seed)
    assert time.perf_counter() - started < 5  # 0-100000 took > 30 s before any output
    line = _one_line_error(res, 2)
    assert "--seed" in line and match in line, line
    assert calls == []


def test_valid_seed_range_is_what_numpy_and_torch_accept():
    from czsl_bench import api, seeding

    assert api.SEED_LIMIT == seeding.SEED_LIMIT == 2**32
    assert api.parse_seeds(f"{2**32 - 2}-{2**32 - 1}") == [2**32 - 2, 2**32 - 1]
    seeding.seed_everything(2**32 - 1)  # the largest seed works everywhere
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 4294967295\]"):
        seeding.seed_everything(2**64)
    assert api.parse_seeds("0-999") == list(range(1000))
    assert api.parse_seeds("3,1,3,2-4") == [3, 1, 2, 4]
    with pytest.raises(ValueError, match="more than 1000 seeds"):
        api.parse_seeds(range(10**12))  # refused after 1001 items, not after materialising a trillion


# ----------------------------------------------------------------------------------------------
# fuzzing: whatever the input, the CLI ends with a result or one line, never a traceback
# ----------------------------------------------------------------------------------------------
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_CSP_KEYS = ["lr", "max_grad_norm", "score_block", "batch_size", "epochs", "attr_dropout", "optimizer",
             "amp", "select_metric", "grad_accum", "context_length", "weight_decay"]
_TRICKY = ["nan", "NaN", "inf", "-inf", "1e999", "-1e999", "0", "-1", "1", "1e-3", "2.5", "1e4", "true", "none",
           "[1, 2]", "{}", "", " ", "adam", "0x10", "١", "9" * 400]


def _assert_clean(res, codes):
    assert res.exit_code in codes, (res.exit_code, res.output)
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    if res.exit_code:
        assert len([ln for ln in res.output.splitlines() if ln.startswith("Error:")]) == 1, res.output


@FUZZ
@given(key=st.sampled_from(_CSP_KEYS + ["nope", "", "lr.x", "a.b.c", "=", "optimizer.name"]) | st.text(max_size=12),
       value=st.sampled_from(_TRICKY) | st.text(max_size=12), raw=st.booleans())
def test_fuzz_set(key, value, raw):
    import math

    item = value if raw else f"{key}={value}"
    with _no_runs() as calls:
        res = _run("csp", "--dataset", "synthetic", "--set", item)
    _assert_clean(res, (0, 2))
    if res.exit_code == 0:  # accepted: then the resolved config is one a run can use
        from czsl_bench import api
        from czsl_bench.registry import METHODS

        cls = METHODS.get("csp")
        cfg = api.resolve_method_config(cls, "synthetic", [item]).config
        assert len(calls) == 1
        assert all(math.isfinite(getattr(cfg, k)) for k in _float_fields(cls.Config))
        assert cfg.score_block >= 1 and cfg.batch_size >= 1 and cfg.text_batch_size >= 1


@FUZZ
@given(seed=st.text(alphabet="0123456789-, x_+٣", max_size=24)
       | st.integers(-(2**70), 2**70).map(str)
       | st.tuples(st.integers(-5, 2**40), st.integers(-5, 2**40)).map(lambda t: f"{t[0]}-{t[1]}"))
def test_fuzz_seed(seed):
    import time

    started = time.perf_counter()
    with _no_runs() as calls:
        res = _run("clip", "--dataset", "synthetic", "--seed", seed)
    assert time.perf_counter() - started < 5, seed
    _assert_clean(res, (0, 2))
    if res.exit_code == 0:
        seeds = [spec.seed for spec in calls]
        assert seeds and len(seeds) == len(set(seeds)) <= 1000
        assert all(0 <= s < 2**32 for s in seeds)


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool, torch.complex64]


@st.composite
def _entry(draw):
    kind = draw(st.sampled_from(["tensor", "tensor", "tensor", "str", "list", "int", "none"]))
    if kind == "str":
        return draw(st.text(max_size=5))
    if kind == "list":
        return draw(st.lists(st.one_of(st.integers(-3, 5), st.floats(allow_nan=True), st.text(max_size=2)),
                             max_size=5))
    if kind == "int":
        return draw(st.integers(-3, 5))
    if kind == "none":
        return None
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    dtype = draw(st.sampled_from(_DTYPES))
    t = torch.randint(-2, 6, shape).to(dtype) if dtype != torch.bool else torch.randint(0, 2, shape).bool()
    if dtype.is_floating_point and t.numel() and draw(st.booleans()):
        t.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), 1e30]))
    return t


@FUZZ
@given(entries=st.dictionaries(st.sampled_from(["scores", "gt_pair", "seen_mask", "candidate_mask", "pair_attr",
                                                "pair_obj", "other"]), _entry(), max_size=7),
       good=st.booleans(), topk=st.sampled_from(["1", "2", "0", "-1", "x", "99"]),
       threshold=st.sampled_from([None, "0.5", "nan", "inf", "-10", "x"]), feas=_entry())
def test_fuzz_evaluate(entries, good, topk, threshold, feas):
    import tempfile
    from pathlib import Path

    data = dict(_golden(), **entries) if good else entries  # half the cases: one bad entry in a good file
    with tempfile.TemporaryDirectory() as tmp:
        f, ff = Path(tmp) / "s.pt", Path(tmp) / "f.pt"
        torch.save(data, f)
        torch.save({"feasibility": feas}, ff)
        args = ["evaluate", str(f), "--topk", topk]
        if threshold is not None:
            args += ["--feasibility", str(ff), "--threshold", threshold]
        res = CliRunner().invoke(cli, args)
    _assert_clean(res, (0, 1, 2))


# ----------------------------------------------------------------------------------------------
# evaluate on a dense matrix: the streaming reducer, identical to the literal protocol
# ----------------------------------------------------------------------------------------------
def _same_result(a, b) -> None:
    da, db = a.as_dict(), b.as_dict()
    assert da.keys() == db.keys()
    for k in da:
        x, y = da[k], db[k]
        assert x == y or (isinstance(x, float) and x != x and y != y), (k, x, y)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("grid", [None, 1.0, 0.5], ids=["no-ties", "integer-ties", "half-integer-ties"])
@pytest.mark.parametrize("topk", [1, 2])
def test_evaluate_equals_the_literal_protocol(seed, grid, topk):
    from czsl_bench.evaluation import evaluate, evaluate_dense

    g = torch.Generator().manual_seed(seed)
    n, p = 150, 40
    s = 20 + 3 * torch.randn(n, p, generator=g)
    if grid is not None:
        s = torch.round(s / grid) * grid
    seen = torch.rand(p, generator=g) < 0.5
    seen[0], seen[1] = True, False
    cand = (torch.rand(p, generator=g) < 0.8) | seen
    cand[1] = True
    ci = cand.nonzero().flatten()
    gt = ci[torch.randint(len(ci), (n,), generator=g)]
    s[torch.arange(n), gt] += 2 * torch.rand(n, generator=g)
    pa, po = torch.arange(p) % 6, torch.arange(p) % 7
    _same_result(evaluate(s, gt, seen, cand, pa, po, topk=topk), evaluate_dense(s, gt, seen, cand, pa, po, topk=topk))


def test_evaluate_does_not_rescore_the_matrix_per_bias(monkeypatch):
    from czsl_bench.evaluation import evaluate, metrics, streaming

    rescored = []
    real = metrics._matches

    def counting(scores, inp, bias, *a, **kw):
        rescored.append(scores.shape[0])
        return real(scores, inp, bias, *a, **kw)

    monkeypatch.setattr(metrics, "_matches", counting)
    monkeypatch.setattr(streaming, "_matches", counting)
    g = torch.Generator().manual_seed(0)
    s = 20 + 3 * torch.randn(500, 300, generator=g)  # continuous scores: no tie to re-read
    gt = torch.randint(300, (500,), generator=g)
    s[torch.arange(500), gt] += 6 * torch.rand(500, generator=g)
    seen = torch.arange(300) % 2 == 0
    r = evaluate(s, gt, seen)
    assert len(r.biases) > 10 and rescored == []  # the old dense path rescored all 500 rows per bias


def test_run_records_name_the_cpu_kernels_torch_dispatches_to():
    from czsl_bench.records import describe_device, environment

    device = describe_device("cpu")
    assert device["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert device["cpu_model"] and device["cpu_model"] != "" and "torch_threads" in device
    assert "blas" in device or "onednn" in device or not torch.backends.mkldnn.is_available()
    assert environment("cpu")["device"]["cpu_capability"] == device["cpu_capability"]
