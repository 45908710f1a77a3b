"""MIT-States (Isola et al., CVPR 2015) with the TMN ``compositional-split-natural`` split.

Layout after ``czsl-bench data prepare mit-states`` (docs/datasets.md)::

    <root>/images/<attr>_<obj>/<file>.jpg      release_dataset/images/* with folder names s/ /_/g
    <root>/compositional-split-natural/{train,val,test}_pairs.txt
    <root>/metadata_compositional-split-natural.t7
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .plugin import Source, StandardDataset, pair_stats

SPLIT_TARBALL = Source(
    key="splits",
    urls=(
        "https://senthilpurushwalkam.com/publications/compositional/compositional_split_natural.tar.gz",
        "https://raw.githubusercontent.com/senthilps8/senthilps8.github.io/"
        "c862f6597a06d44a7031861107127e00d43dfb72/publications/compositional/compositional_split_natural.tar.gz",
    ),
    filename="compositional_split_natural.tar.gz",
    sha256="8fde559df6483c766531bf5addc6d61a5742ddc780d013e61673949ad2e0d7e1",
    size=2_266_497,
    note="TMN split tarball (MIT-States + UT-Zappos); only downloaded with --splits-from upstream, "
    "the package ships byte-identical copies",
)


class MITStates(StandardDataset):
    def prepare_layout(self, root: Path, archives: dict[str, Path], log: Callable[[str], None]) -> None:
        from .prepare import extract_zip_tree, install_split_files

        install_split_files(self, root, archives.get("splits"), tar_prefix="mit-states", log=log)
        # release_dataset/images/<adj noun>/x.jpg -> images/<adj_noun>/x.jpg: the Perl `rename
        # "s/ /_/g"` of the reference scripts, done in Python (it is missing on many systems)
        extract_zip_tree(archives["images"], "release_dataset/images/", root / "images",
                         rename_folder=lambda folder: folder.replace(" ", "_"), log=log)


plugin = MITStates(
    name="mit-states",
    recipe="mit-states",
    feasibility="glove-reference",  # the GloVe vectors the papers used (docs/evaluation.md)
    title="MIT-States",
    citation=(
        "P. Isola, J. J. Lim, E. H. Adelson. Discovering States and Transformations in Image Collections. "
        "CVPR 2015. Split: S. Purushwalkam, M. Nickel, A. Gupta, M. Ranzato. Task-Driven Modular Networks "
        "for Zero-Shot Compositional Learning. ICCV 2019."
    ),
    homepage="http://web.mit.edu/phillipi/Public/states_and_transformations/index.html",
    stats=pair_stats(115, 245, 1262, 300, 300, 400, 400, images=(30_338, 10_420, 12_995)),
    sources=(
        Source(
            key="images",
            urls=("http://wednesday.csail.mit.edu/joseph_result/state_and_transformation/release_dataset.zip",),
            filename="release_dataset.zip",
            note="no published checksum: its sha256 is recorded after the first download",
        ),
        SPLIT_TARBALL,
    ),
    manual_steps=(
        "download http://wednesday.csail.mit.edu/joseph_result/state_and_transformation/release_dataset.zip",
        "unzip release_dataset/images/* into <root>/images/ and replace spaces by '_' in the folder names",
        "copy the split files and metadata shipped in czsl_bench/datasets/canonical/mit-states/ (or from the TMN split tarball) into <root>",
    ),
    size_note="release_dataset.zip is about 2 GB; 53,753 split images",
)
