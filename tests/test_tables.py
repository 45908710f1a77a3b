"""Result tables: golden Markdown and LaTeX for a fixed set of records, aggregation, bolding, views."""

from __future__ import annotations

import io
import statistics
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from czsl_bench.records import load_records
from czsl_bench.tables import (
    build_ablation_table,
    build_table,
    render,
    to_csv,
    to_html,
    to_latex,
    to_markdown,
)
from fixtures.records import make_run_record, metrics4

REPORTED = Path(__file__).resolve().parents[1] / "results" / "reported"


# what each ablation label of these records changes (an ablation run is a changed configuration)
VARIANT_OVERRIDES = {"k1": {"K": 1}, "no-pdl": {"use_pdl": False}, "full": {}}


def rec(method, dataset, seed, s, u, hm, auc, setting="closed", variant=None, split="test", **fields):
    return make_run_record(method, dataset, setting, seed, metrics4(s, u, hm, auc, split), variant=variant,
                           overrides=VARIANT_OVERRIDES.get(variant, {}), **fields)


# Fixed records: CSP with 3 seeds, ClusPro with 2 (MIT-States) and 1 (UT-Zappos), CLIP with 1,
# two ClusPro ablation variants and one open-world run (neither belongs in the closed main table).
RECORDS = [
    rec("csp", "mit-states", 0, 0.466, 0.499, 0.363, 0.194),
    rec("csp", "mit-states", 1, 0.470, 0.501, 0.365, 0.196),
    rec("csp", "mit-states", 2, 0.462, 0.503, 0.361, 0.192),
    rec("cluspro", "mit-states", 0, 0.521, 0.540, 0.407, 0.238),
    rec("cluspro", "mit-states", 1, 0.523, 0.536, 0.409, 0.236),
    rec("cluspro", "ut-zappos", 0, 0.707, 0.760, 0.585, 0.466),
    rec("clip", "mit-states", 0, 0.302, 0.460, 0.261, 0.110),
    rec("clip", "ut-zappos", 0, 0.158, 0.491, 0.156, 0.050),
    rec("cluspro", "ut-zappos", 0, 0.689, 0.736, 0.552, 0.428, variant="k1"),
    rec("cluspro", "ut-zappos", 1, 0.691, 0.738, 0.556, 0.432, variant="k1"),
    rec("cluspro", "ut-zappos", 0, 0.672, 0.741, 0.549, 0.426, variant="no-pdl"),
    rec("csp", "mit-states", 0, 0.463, 0.157, 0.174, 0.057, setting="open"),
]

GOLDEN_MARKDOWN = """\
| Method   |   MIT-States S |   MIT-States U |   MIT-States HM |   MIT-States AUC |   UT-Zappos S |   UT-Zappos U |   UT-Zappos HM |   UT-Zappos AUC |
|----------|----------------|----------------|-----------------|------------------|---------------|---------------|----------------|-----------------|
| CLIP     |           30.2 |           46.0 |            26.1 |             11.0 |          15.8 |          49.1 |           15.6 |             5.0 |
| CSP      |     46.6 ± 0.4 |     50.1 ± 0.2 |      36.3 ± 0.2 |       19.4 ± 0.2 |             – |             – |              – |               – |
| ClusPro  | **52.2 ± 0.1** | **53.8 ± 0.3** |  **40.8 ± 0.1** |   **23.7 ± 0.1** |      **70.7** |      **76.0** |       **58.5** |        **46.6** |
"""

GOLDEN_LATEX = r"""\begin{tabular}{lcccccccc}
\toprule
Method & \multicolumn{4}{c}{MIT-States} & \multicolumn{4}{c}{UT-Zappos} \\
\cmidrule(lr){2-5} \cmidrule(lr){6-9}
 & S & U & HM & AUC & S & U & HM & AUC \\
\midrule
CLIP & 30.2 & 46.0 & 26.1 & 11.0 & 15.8 & 49.1 & 15.6 & 5.0 \\
CSP & 46.6 $\pm$ 0.4 & 50.1 $\pm$ 0.2 & 36.3 $\pm$ 0.2 & 19.4 $\pm$ 0.2 & -- & -- & -- & -- \\
ClusPro & \textbf{52.2 $\pm$ 0.1} & \textbf{53.8 $\pm$ 0.3} & \textbf{40.8 $\pm$ 0.1} & \textbf{23.7 $\pm$ 0.1} & \textbf{70.7} & \textbf{76.0} & \textbf{58.5} & \textbf{46.6} \\
\bottomrule
\end{tabular}
"""

GOLDEN_ABLATION_MARKDOWN = """\
| Variant   |   UT-Zappos S |   UT-Zappos U |   UT-Zappos HM |   UT-Zappos AUC |
|-----------|---------------|---------------|----------------|-----------------|
| full      |      **70.7** |      **76.0** |       **58.5** |        **46.6** |
| no-pdl    |          67.2 |          74.1 |           54.9 |            42.6 |
| k1        |    69.0 ± 0.1 |    73.7 ± 0.1 |     55.4 ± 0.3 |      43.0 ± 0.3 |
"""

GOLDEN_ABLATION_LATEX = r"""\begin{tabular}{lcccc}
\toprule
Variant & \multicolumn{4}{c}{UT-Zappos} \\
\cmidrule(lr){2-5}
 & S & U & HM & AUC \\
\midrule
full & \textbf{70.7} & \textbf{76.0} & \textbf{58.5} & \textbf{46.6} \\
k1 & 69.0 $\pm$ 0.1 & 73.7 $\pm$ 0.1 & 55.4 $\pm$ 0.3 & 43.0 $\pm$ 0.3 \\
no-pdl & 67.2 & 74.1 & 54.9 & 42.6 \\
\bottomrule
\end{tabular}
"""


def test_golden_markdown():
    assert to_markdown(build_table(RECORDS, "closed")) == GOLDEN_MARKDOWN


def test_golden_latex_booktabs():
    assert to_latex(build_table(RECORDS, "closed")) == GOLDEN_LATEX


def test_golden_ablation_views():
    declared = build_ablation_table(RECORDS, "cluspro", "closed", datasets=["ut-zappos"],
                                    variant_order=["no-pdl", "k1"])
    assert to_markdown(declared) == GOLDEN_ABLATION_MARKDOWN
    by_name = build_ablation_table(RECORDS, "cluspro", "closed", datasets=["ut-zappos"])
    assert to_latex(by_name) == GOLDEN_ABLATION_LATEX


def test_mean_and_sample_std_over_seeds():
    table = build_table(RECORDS, "closed")
    csp_auc = [19.4, 19.6, 19.2]
    assert table.mean.loc["CSP", ("MIT-States", "AUC")] == pytest.approx(statistics.mean(csp_auc))
    assert table.std.loc["CSP", ("MIT-States", "AUC")] == pytest.approx(statistics.stdev(csp_auc))
    assert table.n.loc["CSP", ("MIT-States", "AUC")] == 3
    assert pd.isna(table.std.loc["CLIP", ("MIT-States", "AUC")])  # one seed: no std


def test_filters_and_order_follow_the_request():
    table = build_table(RECORDS, "closed", datasets=["ut-zappos", "mit-states"], methods=["cluspro", "clip"])
    assert list(table.mean.index) == ["ClusPro", "CLIP"]
    assert list(dict.fromkeys(table.mean.columns.get_level_values(0))) == ["UT-Zappos", "MIT-States"]
    open_table = build_table(RECORDS, "open")
    assert list(open_table.mean.index) == ["CSP"]
    assert build_table(RECORDS, "closed", split="val").empty  # these records have test metrics only


def test_ties_at_the_displayed_precision_are_all_bold():
    records = [rec("csp", "ut-zappos", 0, 0.5001, 0.3, 0.2, 0.1), rec("coop", "ut-zappos", 0, 0.4999, 0.2, 0.2, 0.1)]
    table = build_table(records, "closed")
    assert bool(table.best_mask()[("UT-Zappos", "S")].all())
    assert to_markdown(table).count("**50.0**") == 2


def test_with_reported_adds_paper_rows_after_each_method():
    reported = load_records(REPORTED)
    table = build_table(RECORDS + reported, "closed", methods=["csp", "cluspro"], with_reported=True)
    assert list(table.mean.index) == ["CSP", "CSP (paper)", "ClusPro", "ClusPro (paper)"]
    assert table.mean.loc["ClusPro (paper)", ("UT-Zappos", "AUC")] == pytest.approx(46.6)
    assert table.std.loc["ClusPro (paper)", ("UT-Zappos", "AUC")] == pytest.approx(0.5)  # the paper's ±
    assert "C-GQA" in table.mean.columns.get_level_values(0)
    without = build_table(RECORDS + reported, "closed")
    assert not any("(paper)" in row for row in without.mean.index)


def test_paper_rows_only_render_the_published_closed_table():
    table = build_table(load_records(REPORTED), "closed", with_reported=True,
                        methods=["clip", "coop", "csp", "plid", "troika", "cluspro"])
    text = to_markdown(table)
    assert text.splitlines()[2].startswith("| CLIP (paper)")
    # ClusPro holds the best value of every column of its Table 1 (the methods that table compares)
    assert text.splitlines()[-1].startswith("| ClusPro (paper)")
    assert text.splitlines()[-1].count("**") == 2 * 12
    # the 2025 rows (VP-CMJL, CAMS) join the full table and take some of those bests
    everything = to_markdown(build_table(load_records(REPORTED), "closed", with_reported=True))
    assert "| CAMS (paper)" in everything and "| VP-CMJL (paper)" in everything


def test_csv_is_tidy_numbers():
    frame = pd.read_csv(io.StringIO(to_csv(build_table(RECORDS, "closed"))))
    assert list(frame.columns) == ["method", "name", "source", "dataset", "metric", "setting", "split",
                                   "mean", "std", "n"]
    row = frame[(frame.name == "csp") & (frame.metric == "S")].iloc[0]
    assert row["mean"] == pytest.approx(46.6) and row["std"] == pytest.approx(0.4) and row["n"] == 3
    assert len(frame) == 4 + 4 + 8 + 8 - 4  # CSP has no UT-Zappos cells


def test_html_is_stable_and_bolds_the_best():
    table = build_table(RECORDS, "closed")
    html = to_html(table)
    assert html == to_html(build_table(RECORDS, "closed"))
    assert "font-weight: bold" in html and "52.2 ± 0.1" in html and "<caption>" in html


def test_latex_escapes_row_labels():
    table = build_table([rec("my_method+co", "synthetic", 0, 0.5, 0.5, 0.5, 0.25)], "closed")
    assert r"my\_method+co &" in to_latex(table)


def test_render_rejects_unknown_formats():
    with pytest.raises(ValueError, match="unknown table format 'docx'"):
        render(build_table(RECORDS, "closed"), "docx")


def test_duplicate_records_are_counted_once():
    with pytest.warns(UserWarning, match="two records"):
        table = build_table(RECORDS + [RECORDS[0]], "closed")
    assert table.n.loc["CSP", ("MIT-States", "S")] == 3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1.0, allow_nan=False), min_size=1, max_size=6))
def test_aggregate_matches_statistics_module(values):
    records = [rec("csp", "synthetic", i, v, 0.5, 0.4, 0.2) for i, v in enumerate(values)]
    table = build_table(records, "closed")
    assert table.mean.loc["CSP", ("Synthetic", "S")] == pytest.approx(100 * statistics.mean(values), abs=1e-9)
    std = table.std.loc["CSP", ("Synthetic", "S")]
    if len(values) >= 2:
        assert std == pytest.approx(100 * statistics.stdev(values), abs=1e-7)
    else:
        assert pd.isna(std)


def test_ablation_named_full_merges_with_plain_runs_counting_each_seed_once():
    records = [
        rec("cluspro", "ut-zappos", 0, 0.70, 0.76, 0.58, 0.46),
        rec("cluspro", "ut-zappos", 0, 0.70, 0.76, 0.58, 0.46, variant="full"),  # same run key, same config
        rec("cluspro", "ut-zappos", 1, 0.72, 0.74, 0.60, 0.48, variant="full"),
    ]
    table = build_ablation_table(records, "cluspro", "closed")
    assert list(table.mean.index) == ["full"]
    assert table.n.loc["full", ("UT-Zappos", "AUC")] == 2
    assert table.mean.loc["full", ("UT-Zappos", "AUC")] == pytest.approx(47.0)


def test_ablation_view_with_published_rows_reproduces_the_papers_table():
    records = RECORDS + load_records(REPORTED)
    table = build_ablation_table(records, "cluspro", "closed", datasets=["ut-zappos"], with_reported=True,
                                 variant_order=["no-pdl", "k-1", "k1"])
    assert list(table.mean.index) == [
        "full", "full (paper)", "no-pdl", "no-pdl (paper)", "k-1 (paper)", "k1",  # declared order first
        "base (paper)", "k-10 (paper)", "k-20 (paper)", "k-3 (paper)", "k-5 (paper)", "mu-0 (paper)",
        "mu-0.5 (paper)", "mu-0.9 (paper)", "mu-0.99 (paper)", "mu-0.999 (paper)", "no-pcl (paper)",
    ]
    assert table.mean.loc["no-pdl (paper)", ("UT-Zappos", "AUC")] == pytest.approx(45.9)
    assert table.std.loc["full (paper)", ("UT-Zappos", "AUC")] == pytest.approx(0.5)
    plain = build_ablation_table(records, "cluspro", "closed", datasets=["ut-zappos"])
    assert not any(row.endswith("(paper)") for row in plain.mean.index)
