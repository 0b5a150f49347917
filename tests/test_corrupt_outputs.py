"""A truncated masks or adapter file, or an adapter file missing a tensor, is named with what to do, not a bare
safetensors message or KeyError."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from taso_llm.adapters import attach_updates
from taso_llm.adapters.io import load_adapter, save_adapter
from taso_llm.io import CorruptFileError
from taso_llm.sparse.masks import load_masks, save_masks
from taso_llm.sparse.regions import Region


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 6)


def _region():
    return Region("lora_block", (6, 8), torch.tensor([1, 4]), torch.tensor([0, 3, 5]), rank=2)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


def test_truncated_masks_file_is_named(tmp_path):
    path = tmp_path / "masks.safetensors"
    save_masks(path, {"q_proj": _region()}, "toy")
    assert load_masks(path)[0]["q_proj"].rows.tolist() == [1, 4]
    _truncate(path)
    with pytest.raises(CorruptFileError, match=f"masks file {path}.*drop masks_path"):
        load_masks(path)


def test_truncated_or_incomplete_adapter_is_named(tmp_path):
    model = Toy()
    attach_updates(model, {"q_proj": _region()})
    save_adapter(model, tmp_path, base_model="toy")
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(weights)
    del state["q_proj.lora_B"]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"lacks \['q_proj.lora_B'\]"):
        load_adapter(Toy(), tmp_path)
    _truncate(weights)
    with pytest.raises(CorruptFileError, match=f"adapter weights {weights}"):
        load_adapter(Toy(), tmp_path)
