"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def private_metadata_cache(tmp_path_factory):
    """Keep the metadata cache (czsl_bench.cache root) inside pytest's temporary folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CZSL_CACHE", str(tmp_path_factory.getbasetemp() / "czsl-cache"))
        yield
