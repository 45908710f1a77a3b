"""UT-Zappos50K (Yu & Grauman, CVPR 2014 / ICCV 2017) with the TMN ``compositional-split-natural`` split.

Layout after ``czsl-bench data prepare ut-zappos`` (docs/datasets.md)::

    <root>/_images/<Category>/<Subcategory>/<Brand>/<file>.jpg   the original UT-Zap50K tree
    <root>/images/<attr>_<obj>/<file>.jpg                        made from the metadata's `_image` -> `image`
    <root>/compositional-split-natural/{train,val,test}_pairs.txt
    <root>/metadata_compositional-split-natural.t7

The reference scripts call the folder ``ut-zap50k`` and copy files; czsl-bench uses the CSP/PLID
name ``ut-zappos`` and hard-links when the file system allows (copies otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .mit_states import SPLIT_TARBALL
from .plugin import Source, StandardDataset, pair_stats


class UTZappos(StandardDataset):
    def prepare_layout(self, root: Path, archives: dict[str, Path], log: Callable[[str], None]) -> None:
        from .prepare import extract_zip_tree, install_split_files, reorganize_utzappos

        install_split_files(self, root, archives.get("splits"), tar_prefix="ut-zap50k", log=log)
        extract_zip_tree(archives["images"], None, root / "_images", log=log)
        reorganize_utzappos(root, log=log)


plugin = UTZappos(
    name="ut-zappos",
    recipe="ut-zappos",
    feasibility="glove-reference",  # the GloVe vectors the papers used (docs/evaluation.md)
    title="UT-Zappos50K",
    citation=(
        "A. Yu, K. Grauman. Fine-Grained Visual Comparisons with Local Learning. CVPR 2014; "
        "A. Yu, K. Grauman. Semantic Jitter: Dense Supervision for Visual Comparisons via Synthetic "
        "Images. ICCV 2017. Split: S. Purushwalkam et al. Task-Driven Modular Networks for Zero-Shot "
        "Compositional Learning. ICCV 2019."
    ),
    homepage="https://vision.cs.utexas.edu/projects/finegrained/utzap50k/",
    stats=pair_stats(16, 12, 83, 15, 15, 18, 18, images=(22_998, 3_214, 2_914)),
    sources=(
        Source(
            key="images",
            urls=("http://vision.cs.utexas.edu/projects/finegrained/utzap50k/ut-zap50k-images.zip",),
            filename="ut-zap50k-images.zip",
            note="no published checksum: its sha256 is recorded after the first download",
        ),
        SPLIT_TARBALL,
    ),
    manual_steps=(
        "download http://vision.cs.utexas.edu/projects/finegrained/utzap50k/ut-zap50k-images.zip",
        "unzip it so that <root>/_images/Shoes/... exists",
        "copy each metadata record's _images/<_image> to images/<image>",
        "copy the split files and metadata shipped in czsl_bench/datasets/canonical/ut-zappos/ (or from the TMN split tarball) into <root>",
    ),
    size_note="ut-zap50k-images.zip is about 1.7 GB; 29,126 split images",
)
