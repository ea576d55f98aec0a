"""Shared fixtures: everything is built locally, nothing is downloaded."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_sessionfinish(session):
    """Stop the Slurm daemons and delete the network namespaces this session brought up (tests/infra)."""
    from infra_state import release_infra

    note = release_infra()
    if note:
        print(f"\ntest infrastructure: {note}")


@pytest.fixture(scope="session")
def tokenizer():
    from fpo_ds.tools.demo import toy

    texts = [p[k] for p in toy.toy_pairs(200, 0) for k in ("prompt", "chosen", "rejected")] + ["user", "model"]
    return toy.build_tokenizer(texts)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny gemma2 world on disk (model dir + jsonl data)."""
    from fpo_ds.tools.demo import toy

    return toy.write_world(tmp_path_factory.mktemp("world"), "gemma2", n_train=64, n_eval=16)
