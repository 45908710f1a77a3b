"""``czsl-bench explain``: why a method scored one test image the way it did, as PNG and JSON.

:func:`prepare` builds the method exactly as a run does (same config resolution, seed, backbone
and feature cache). A method that trains goes through the shared Trainer with ``resume=True``
on the run's checkpoint folder: when ``czsl-bench run`` (or an earlier ``explain``) already
trained it, the last checkpoint is loaded and the best epoch restored without training again;
otherwise it trains now, exactly as ``run`` would, and leaves the checkpoint for next time.

The explanation is the method's own :meth:`~czsl_bench.method.Method.explain` (LaZSL: descriptor
contributions, transport plans, region heatmaps; the three-path methods: composition and
primitive terms, ClusPro's nearest prototypes; CLIP/CoOp/CSP: the top pairs), else the top pairs
of its scores. Every ``contributions`` list is checked to sum to its pair's score before
anything is drawn. Files are written atomically.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GROUP_COLOURS = {"pair": "tab:blue", "attr": "tab:orange", "obj": "tab:green", "attr x obj": "tab:purple"}


# ---------------------------------------------------------------------------------------------
# Building the method
# ---------------------------------------------------------------------------------------------
def prepare(method: str, dataset: str, seed: int = 0, *, backbone: str | None = None,
            pretrained: str | None = None, overrides: Sequence[str] = (), ablation: str | None = None,
            results_dir: str | Path = "results", device: str = "auto", data_root: str | Path | None = None,
            cache_dir: str | Path | None = None, progress: Any = None) -> tuple[Any, Any]:
    """The prepared (and, if it trains, trained or restored) method and its RunContext: the run
    the harness would make (same identity, same checkpoint folder, resumed when it is there)."""
    from czsl_bench import api

    spec = api.RunSpec(method, dataset, seed, ("closed",))
    opts = api.RunOptions(backbone=backbone, pretrained=pretrained, overrides=list(overrides), ablation=ablation,
                          results_dir=results_dir, resume=True, device=device, data_root=data_root,
                          cache_dir=cache_dir, progress=progress)
    run = api.prepare_and_train(api.setup_run(spec, opts), opts, ("closed",))
    return run.method, run.ctx


def explain_one(method: Any, ctx: Any, split: Any, index: int, top: int = 3) -> dict[str, Any]:
    """The method's explanation of image ``index`` (or the generic top pairs), checked."""
    from czsl_bench.method import Method

    if not 0 <= index < len(split):
        raise ValueError(f"index {index} is outside the {split.name} split (0-{len(split) - 1})")
    if type(method).explain is not Method.explain:
        out = method.explain(ctx, split, index, top)
    else:
        out = generic_explanation(method, ctx, split, index, top)
    out.setdefault("method", method.name)
    out.setdefault("index", int(index))
    out.setdefault("split", split.name)
    out.setdefault("world", split.world)
    out.setdefault("true_seen", bool(split.seen_mask[int(split.labels[index])]))
    check_contributions(out)
    return out


def generic_explanation(method: Any, ctx: Any, split: Any, index: int, top: int = 3) -> dict[str, Any]:
    """Top pairs of one image from the method's scores (no decomposition)."""
    import torch

    with torch.no_grad():
        scores = method.score(ctx, split)
    if not isinstance(scores, torch.Tensor):
        row = torch.cat([block[index:index + 1] for _, block in scores], dim=1)[0]
    else:
        row = scores[index]
    row = torch.where(split.candidate_mask.bool(), row.float(), torch.full_like(row.float(), -math.inf))
    order = row.argsort(descending=True)
    gt = int(split.labels[index])
    return {"image": split.images[index], "true_pair": " ".join(split.pairs[gt]),
            "true_rank": int((order == gt).nonzero()[0, 0]) + 1,
            "ranking": "by raw score among the split's candidate pairs (no unseen bias)",
            "top": [{"pair": " ".join(split.pairs[int(j)]), "score": float(row[j]), "seen": bool(split.seen_mask[j])}
                    for j in order[:top]]}


def check_contributions(expl: dict[str, Any], tol: float = 1e-4) -> None:
    """Raise when a pair's contributions do not add up to its score."""
    for entry in expl.get("top", []):
        parts = entry.get("contributions")
        if not parts:
            continue
        total = sum(p["contribution"] for p in parts)
        if abs(total - entry["score"]) > tol * max(1.0, abs(entry["score"])):
            raise RuntimeError(f"{expl.get('method')}: the contributions of {entry['pair']} sum to {total:.6f}, "
                               f"not to its score {entry['score']:.6f}")


def parse_indices(value: str, n: int) -> list[int]:
    """``"5"``, ``"0-15"`` or ``"3,8,12"`` -> indices, each checked against a split of ``n``."""
    out: list[int] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, _, hi = part.partition("-")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--index {value!r}: write N, A-B or A,B,C") from None
    bad = [i for i in out if not 0 <= i < n]
    if bad or not out:
        raise ValueError(f"--index {value!r}: indices must lie in 0-{n - 1}")
    return list(dict.fromkeys(out))


def spread_indices(split: Any, n: int) -> list[int]:
    """``n`` images spread evenly over the split, alternating seen and unseen true pairs."""
    seen = [i for i in range(len(split)) if bool(split.seen_mask[int(split.labels[i])])]
    unseen = [i for i in range(len(split)) if not bool(split.seen_mask[int(split.labels[i])])]
    pick: list[int] = []
    for group, k in ((seen, (n + 1) // 2), (unseen, n // 2)):
        if group and k:
            step = len(group) / k
            pick += [group[int(i * step)] for i in range(min(k, len(group)))]
    return sorted(pick)[:n]


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _image(split: Any, index: int):
    import numpy as np

    from czsl_bench.datasets.czsl_format import decode_image

    return np.asarray(decode_image(split.image_path(index)))


def _short(text: str, width: int = 34, lines: int = 2) -> str:
    wrapped = textwrap.wrap(text, width)
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1] + "…"
    return "\n".join(wrapped)


def _bars(ax, entry: dict[str, Any], title: str) -> None:
    parts = entry.get("contributions") or [{"text": "score", "group": "pair", "contribution": entry["score"]}]
    labels = [_short(p["text"]) for p in parts]
    ys = list(range(len(parts)))[::-1]
    for y, p in zip(ys, parts):
        colour = GROUP_COLOURS.get(p.get("group"), "0.5")
        if "region" in p and "global" in p:  # LaZSL: region (OT) part solid, global (DCLIP) part light
            ax.barh(y, p["region"], color=colour)
            ax.barh(y, p["global"], left=p["region"], color=colour, alpha=0.35)
        else:
            ax.barh(y, p["contribution"], color=colour)
        ax.text(p["contribution"], y, f" {p['contribution']:.3f}", va="center", fontsize=7)
    ax.set_yticks(ys, labels, fontsize=7)
    total = sum(p["contribution"] for p in parts)
    ax.set_title(f"{title}: {entry['pair']} ({'seen' if entry.get('seen') else 'unseen'})\n"
                 f"score {entry['score']:.3f} = sum of bars {total:.3f}", fontsize=8)
    ax.set_xlabel("contribution to the score", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    lo = min(0.0, min(p["contribution"] for p in parts))
    ax.set_xlim(lo, max(p["contribution"] for p in parts) * 1.35 + 1e-9)
    ax.grid(axis="x", alpha=0.3)


def _heat_array(desc: dict[str, Any]):
    import numpy as np

    return np.array([[np.nan if v is None else v for v in row] for row in desc["heatmap"]], dtype=float)


def _heat(ax, img, desc: dict[str, Any], size: tuple[int, int], spread: float, n_kept: int):
    """One descriptor: its heatmap over the image on a colour scale shared by the whole figure
    (centred on 1 = a uniform plan), its top crops (the best one labelled with its share)."""
    import matplotlib.patches as patches
    import numpy as np

    width, height = size
    ax.imshow(img, extent=(0, width, height, 0))
    heat = np.ma.masked_invalid(_heat_array(desc))
    mappable = ax.imshow(heat, extent=(0, width, height, 0), cmap="RdBu_r", alpha=0.6, vmin=1 - spread,
                         vmax=1 + spread, interpolation="bilinear")
    colours = ["yellow", "white", "white"]
    for rank, crop in enumerate(desc.get("top_crops", [])):
        x0, y0, x1, y1 = crop["box"]
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2.0 if rank == 0 else 0.8,
                                       ec=colours[rank % 3], ls="-" if rank == 0 else "--"))
    if desc.get("top_crops"):
        best = desc["top_crops"][0]
        ax.text(best["box"][0] + 1, best["box"][1] + 1, f"{100 * best['mass']:.1f}%", color="black",
                fontsize=7, va="top", ha="left", bbox=dict(fc="yellow", alpha=0.85, lw=0, pad=0.8))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"[{desc['group']}] {_short(desc['text'], 30, 3)}\ncontributes {desc['contribution']:.3f}",
                 fontsize=7)
    return mappable


def render(expl: dict[str, Any], split: Any, path: str | Path) -> Path:
    """One PNG: the image, the top pairs' scores, the predicted pair's and the runner-up's
    contributions and (LaZSL) each of their descriptors' heatmap with top boxes and mass."""
    import numpy as np

    plt = _plt()
    check_contributions(expl)
    img = _image(split, expl["index"])
    top = expl["top"]
    with_maps = [e for e in top[:2] if e.get("contributions") and "heatmap" in e["contributions"][0]]
    n_maps = max((len(e["contributions"]) for e in with_maps), default=0)
    fig = plt.figure(figsize=(max(15.0, 2.7 * n_maps + 1.0), 3.8 + 2.9 * len(with_maps)), layout="constrained")
    if with_maps:
        upper, lower = fig.subfigures(2, 1, height_ratios=[3.8, 2.9 * len(with_maps)])
    else:
        upper, lower = fig, None
    axes = upper.subplots(1, 4, width_ratios=[1.0, 1.0, 1.5, 1.5])
    # the image
    ax = axes[0]
    ax.imshow(img)
    ax.set_xticks([])
    ax.set_yticks([])
    correct = bool(top) and top[0]["pair"] == expl["true_pair"]
    ax.set_title(f"{expl['image']}\ntrue: {expl['true_pair']} ({'seen' if expl.get('true_seen') else 'unseen'})\n"
                 f"{'correct' if correct else 'wrong'}: true pair ranked {expl['true_rank']}", fontsize=9,
                 color="darkgreen" if correct else "darkred")
    # the top pairs
    ax = axes[1]
    ys = list(range(len(top)))[::-1]
    ax.barh(ys, [e["score"] for e in top],
            color=["darkgreen" if e["pair"] == expl["true_pair"] else "0.55" for e in top])
    ax.set_yticks(ys, [f"{e['pair']}\n({'seen' if e.get('seen') else 'unseen'})" for e in top], fontsize=8)
    for y, e in zip(ys, top):
        ax.text(e["score"], y, f" {e['score']:.3f}", va="center", fontsize=8)
    scores = [e["score"] for e in top]
    span = max(scores) - min(scores)
    ax.set_xlim(min(scores) - span - 1e-6, max(scores) + 0.45 * span + 1e-6)
    ax.set_title(f"{expl.get('method')}: top pairs ({expl.get('world', 'closed')} world)\n"
                 "raw scores among candidates, no bias", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    # contributions of the predicted pair and the runner-up
    for k in range(2):
        if k < len(top):
            _bars(axes[2 + k], top[k], "predicted" if k == 0 else "runner-up")
        else:
            axes[2 + k].axis("off")
    # heatmaps, on one colour scale for the whole figure
    if with_maps:
        # the 98th percentile: a few barely covered border cells must not wash out the scale
        devs = np.concatenate([np.abs(_heat_array(d) - 1).ravel() for e in with_maps for d in e["contributions"]])
        spread = max(0.02, float(np.nanpercentile(devs, 98))) if np.isfinite(devs).any() else 0.02
        grid = lower.subplots(len(with_maps), n_maps, squeeze=False)
        mappable = None
        for r, entry in enumerate(with_maps):
            for c in range(n_maps):
                ax = grid[r, c]
                if c >= len(entry["contributions"]):
                    ax.axis("off")
                    continue
                mappable = _heat(ax, img, entry["contributions"][c], tuple(expl["size"]), spread,
                                 len(entry.get("kept_crops", [])))
                if c == 0:
                    kept = len(entry.get("kept_crops", []))
                    ax.set_ylabel(f"{'predicted' if r == 0 else 'runner-up'}: {entry['pair']}\n"
                                  f"{kept} kept crops, uniform share {100 / max(kept, 1):.1f}%", fontsize=8)
        cbar = lower.colorbar(mappable, ax=grid, shrink=0.9, pad=0.01)
        cbar.set_label("transport mass / uniform\n(1 = no preference)", fontsize=8)
        cbar.ax.tick_params(labelsize=7)
        lower.suptitle("Where each descriptor's transport mass lands, divided by how often the kept crops cover "
                       "each pixel (spec §3). Yellow box: the descriptor's top crop and its share of the "
                       "descriptor's mass; dashed: the next two. Bars above: solid = region (OT) part, "
                       "light = global-view part.", fontsize=8, color="0.25")
    return _save(fig, path)


def contact_sheet(expls: list[dict[str, Any]], split: Any, path: str | Path) -> Path:
    """A grid of images, each with its true pair and top predictions (green = correct)."""
    plt = _plt()
    n = len(expls)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 4.1 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, e in zip(axes.flat, expls):
        ax.imshow(_image(split, e["index"]))
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        lines = [f"#{e['index']} true: {e['true_pair']} ({'seen' if e.get('true_seen') else 'unseen'})"]
        for k, t in enumerate(e["top"][:3]):
            mark = "✓" if t["pair"] == e["true_pair"] else " "
            lines.append(f"{k + 1}. {t['pair']}  {t['score']:.3f} {mark}")
        ok = e["top"] and e["top"][0]["pair"] == e["true_pair"]
        ax.set_title(lines[0], fontsize=7, color="darkgreen" if ok else "darkred")
        ax.set_xlabel("\n".join(lines[1:]), fontsize=7, family="monospace")
    fig.suptitle(f"{expls[0].get('method')} on {split.name} ({expls[0].get('world', 'closed')} world): "
                 f"top-1 {sum(bool(e['top']) and e['top'][0]['pair'] == e['true_pair'] for e in expls)}/{n} "
                 "(raw scores among candidates, no bias)", fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    plt = _plt()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        _readable(tmp)
        os.replace(tmp, target)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _readable(path: str) -> None:
    # mkstemp creates 0600 files; an explanation is meant to be shared, so use the umask's mode
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_json(data: Any, path: str | Path) -> Path:
    """Atomic JSON write (temp file in the same folder, fsync, replace)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        _readable(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


__all__ = ["prepare", "explain_one", "generic_explanation", "check_contributions", "parse_indices",
           "spread_indices", "render", "contact_sheet", "write_json"]
