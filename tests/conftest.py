"""Shared fixtures. The tiny model is built once per test session into a temporary cache (no network)."""

import os
import tempfile

import pytest

os.environ.setdefault("TASO_LLM_CACHE", tempfile.mkdtemp(prefix="taso-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_path():
    from taso_llm.tiny import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture
def tiny_model(tiny_path):
    """A fresh copy per test: tests wrap and train it in place."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path)
