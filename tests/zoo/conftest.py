"""One tiny corpus and one tiny joint pair per test session, shared by the zoo tests."""

from __future__ import annotations

import pytest

from deepseemoe.data.demo_corpus import build_corpus
from deepseemoe.zoo.recipes import get_recipe
from deepseemoe.zoo.train import train_zoo


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    build_corpus(root / "corpus", max_bytes_per_domain=get_recipe("tiny").max_bytes_per_domain)
    return train_zoo(root / "corpus", recipe="tiny", cache_dir=root / "cache", progress=False), root
