"""Model sources and safetensors files fail naming the path and what to do, before any weight is read (issue 11 §4).

Corrupt files are made from good ones by truncating them or flipping the header, as an interrupted copy would.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
from trl import ModelConfig

from taso_llm.io import CorruptFileError, load_safetensors, read_safetensors_header, save_safetensors
from taso_llm.loading import apply_chat_template_path, load_model_and_tokenizer, load_tokenizer, target_shapes
from taso_llm.tiny import default_cache_dir


def truncate(path, keep_bytes: int) -> None:
    os.truncate(path, keep_bytes)


# ------------------------------------------------------------------------------------------------ safetensors
@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "masks.safetensors"
    save_safetensors({"a.rows": torch.arange(6, dtype=torch.int32), "b": torch.ones(3, 2)}, path,
                     metadata={"taso": "{}"})
    return path


def test_load_safetensors_round_trip(good_file):
    tensors = load_safetensors(good_file, what="sparse masks")
    assert torch.equal(tensors["a.rows"], torch.arange(6, dtype=torch.int32)) and tensors["b"].shape == (3, 2)
    assert read_safetensors_header(good_file) == {"taso": "{}"}


DAMAGE = {  # name -> (damage, what the message says)
    "truncated": (lambda p: truncate(p, p.stat().st_size - 5), r"\d+ bytes, but its header describes \d+"),
    "stub": (lambda p: truncate(p, 4), r"4 bytes, shorter than the 8-byte header length"),
    "cut_in_header": (lambda p: truncate(p, 40), r"header length \d+ exceeds the 32 bytes after it"),
    "trailing_bytes": (lambda p: p.write_bytes(p.read_bytes() + b"junk"), r"\d+ bytes, but its header describes"),
    "bad_header": (lambda p: p.write_bytes(p.read_bytes()[:8] + b"#" + p.read_bytes()[9:]),
                   r"header is not valid JSON"),
}


@pytest.mark.parametrize("damage,problem", DAMAGE.values(), ids=DAMAGE)
def test_corrupt_safetensors_named_with_a_fix(good_file, damage, problem):
    damage(good_file)
    fix = "delete it and re-run importance selection"
    pattern = rf"sparse masks {re.escape(str(good_file))}: {problem}.*corrupt or truncated.*To fix: {fix}"
    with pytest.raises(CorruptFileError, match=pattern):
        load_safetensors(good_file, what="sparse masks", fix=fix)


def test_missing_safetensors_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter weights: no file at .*nope\.safetensors"):
        load_safetensors(tmp_path / "nope.safetensors", what="adapter weights")


# ------------------------------------------------------------------------------------------------ model sources
def model_args(path) -> ModelConfig:
    return ModelConfig(model_name_or_path=str(path))


@pytest.mark.parametrize("load", ["shapes", "tokenizer", "model"])
def test_nonexistent_model_path_is_named(tmp_path, load):
    missing = tmp_path / "models" / "llama-8b"
    call = {"shapes": lambda: target_shapes(str(missing), ["q_proj"]),
            "tokenizer": lambda: load_tokenizer(model_args(missing)),
            "model": lambda: load_model_and_tokenizer(model_args(missing))}[load]
    with pytest.raises(FileNotFoundError, match=rf"model_name_or_path='{re.escape(str(missing))}': no such "
                                                 r"directory .*existing model directory or a Hugging Face repo id"):
        call()


def test_model_path_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no config\.json"):
        target_shapes(str(tmp_path / "empty"), ["q_proj"])
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=r"weights\.bin is a file"):
        load_tokenizer(model_args(tmp_path / "weights.bin"))


def test_unloadable_repo_id_says_what_was_tried():
    # Not a valid repo id (no network is touched) and not a local directory either.
    with pytest.raises(OSError, match=r"model_name_or_path='org/na--me': no local directory .*could not be loaded "
                                      r"as a Hugging Face repo id"):
        target_shapes("org/na--me", ["q_proj"])


@pytest.mark.parametrize("in_cache", [False, True])
def test_corrupt_model_weights_named_before_loading(tmp_path, tiny_path, in_cache):
    model_dir = (default_cache_dir() / "taso-tiny-corrupt-test") if in_cache else tmp_path / "my-model"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(tiny_path, model_dir)
    weights = model_dir / "model.safetensors"
    truncate(weights, weights.stat().st_size - 1000)
    fix = (rf"delete the cache entry {re.escape(str(model_dir))} \(taso_llm rebuilds it on next use\)" if in_cache
           else rf"re-save or re-download the model into {re.escape(str(model_dir))}")
    pattern = rf"model weights {re.escape(str(weights))}: .*truncated.*To fix: {fix}"
    try:
        with pytest.raises(CorruptFileError, match=pattern):  # the first step of a run: before the data
            target_shapes(str(model_dir), ["q_proj"])
        with pytest.raises(CorruptFileError, match=pattern):
            load_model_and_tokenizer(model_args(model_dir))
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)


def test_chat_template_path_errors(tmp_path, tiny_tokenizer):
    (tmp_path / "template.txt").write_text("{{ messages }}")
    with pytest.raises(ValueError, match=r"chat_template_path=.*template\.txt.*ending in \.jinja or \.j2"):
        apply_chat_template_path(tiny_tokenizer, str(tmp_path / "template.txt"))
    with pytest.raises(FileNotFoundError, match=r"chat_template_path=.*nope\.jinja.*no such file"):
        apply_chat_template_path(tiny_tokenizer, str(tmp_path / "nope.jinja"))
