"""C-GQA, updated release (Naeem et al., CGE, CVPR 2021; ``cgqa-updated.zip``, Nov 2021).

Layout after ``czsl-bench data prepare cgqa`` (docs/datasets.md)::

    <root>/images/<file>.jpg                  flat, e.g. "<n>-<m>-<attr>-<obj>.jpg"
    <root>/compositional-split-natural/{train,val,test}_pairs.txt
    <root>/metadata_compositional-split-natural.t7

Everything comes from one zip. Image counts are the published ones (no public metadata copy exists
to recount them); the pair files shipped with the package are a third-party copy, not
byte-verified against the zip, so a checksum difference is a warning, never an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .plugin import Source, StandardDataset, pair_stats


class CGQA(StandardDataset):
    def prepare_layout(self, root: Path, archives: dict[str, Path], log: Callable[[str], None]) -> None:
        from .prepare import install_bundle_zip

        install_bundle_zip(archives["cgqa"], root, log=log)


plugin = CGQA(
    name="cgqa",
    recipe="cgqa",
    feasibility="glove-reference",  # the GloVe vectors the papers used (docs/evaluation.md)
    title="C-GQA (updated)",
    citation=(
        "M. F. Naeem, Y. Xian, F. Tombari, Z. Akata. Learning Graph Embeddings for Compositional "
        "Zero-shot Learning. CVPR 2021 (updated release, Nov 2021)."
    ),
    homepage="https://github.com/ExplainableML/czsl",
    stats=pair_stats(413, 674, 5592, 1040, 1252, 888, 923, images=(26_920, 7_280, 5_098),
                     image_provenance="published"),
    sources=(
        Source(
            key="cgqa",
            urls=(
                "https://huggingface.co/datasets/nihalnayak/cgqa/resolve/main/cgqa.zip",
                "https://s3.mlcloud.uni-tuebingen.de/czsl/cgqa-updated.zip",
            ),
            filename="cgqa.zip",
            note="images + split files + metadata; no published checksum (recorded after the first download)",
        ),
    ),
    manual_steps=(
        "download https://huggingface.co/datasets/nihalnayak/cgqa/resolve/main/cgqa.zip "
        "(old mirror: https://s3.mlcloud.uni-tuebingen.de/czsl/cgqa-updated.zip)",
        "unzip it so that <root>/images/, <root>/compositional-split-natural/ and "
        "<root>/metadata_compositional-split-natural.t7 exist",
    ),
    canonical_note="the shipped C-GQA pair files are a third-party copy, not byte-verified against the official zip",
    size_note="cgqa.zip holds 39,298 split images",
)
