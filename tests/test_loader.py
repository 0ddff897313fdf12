"""Model loading: sharded safetensors with an index, dtypes, unsupported architectures, the registry."""

import json

import pytest
import torch
from torch import nn

from mmserve import Engine, ModelRegistry
from mmserve.models.llama import LlamaForCausalLM
from mmserve.models.loader import iterate_weights, resolve_model_path


def test_sharded_checkpoint_streams_every_tensor(tiny_model_dir):
    path = tiny_model_dir("llama")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    names = [name for name, _ in iterate_weights(path)]
    assert sorted(names) == sorted(index["weight_map"])


def test_bfloat16_dtype(tiny_model_dir):
    with Engine(model_path=str(tiny_model_dir("qwen2")), dtype="bfloat16") as engine:
        assert engine.model_config.dtype == torch.bfloat16
        assert engine.runner.kv_pool.k_buffers[0].dtype == torch.bfloat16
        out = engine.generate("Hello", {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True})
        assert len(out["output_ids"]) == 4


def test_unsupported_architecture_lists_supported(tiny_model_dir, tmp_path):
    import shutil

    src = tiny_model_dir("qwen2")
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        Engine(model_path=str(tmp_path / "m"))


def test_registry_serves_an_outside_model_class(tiny_model_dir, tmp_path):
    import shutil

    calls = []

    class MyModel(LlamaForCausalLM):
        qkv_bias = True

        def forward(self, input_ids, positions, batch):
            calls.append(input_ids.shape[0])
            return super().forward(input_ids, positions, batch)

    shutil.copytree(tiny_model_dir("qwen2"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["MyOutsideModel"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    ModelRegistry.register("MyOutsideModel", MyModel)
    assert "MyOutsideModel" in ModelRegistry.supported()
    with Engine(model_path=str(tmp_path / "m")) as engine:
        engine.generate("Hi", {"max_new_tokens": 3, "ignore_eos": True})
    assert calls and isinstance(MyModel, type) and issubclass(MyModel, nn.Module)


def test_missing_path_and_offline_hub_fail_clearly(monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path("/no/such/folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not download 'nosuch-org/nosuch-model'"):
        resolve_model_path("nosuch-org/nosuch-model")


def test_a_shard_reader_reads_the_slices_loaders_ask_for(tmp_path):
    """A tensor-parallel rank's view of a safetensors tensor: narrow and a leading slice come from the file's slice
    (the whole tensor is never read for them); anything else reads the whole tensor and works on it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mmserve.layers.linear import default_weight_loader
    from mmserve.models.loader import ShardReader

    w = torch.arange(48, dtype=torch.bfloat16).reshape(6, 8)
    save_file({"w": w}, tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        lazy = ShardReader(f, "w")
        assert lazy.shape == (6, 8) and lazy.dtype == torch.bfloat16 and lazy.element_size() == 2
        assert torch.equal(lazy.narrow(1, 4, 4), w.narrow(1, 4, 4))
        assert torch.equal(lazy.narrow(0, 2, 3), w[2:5]) and torch.equal(lazy[3:6], w[3:6])
        assert lazy._whole is None  # nothing so far needed the whole tensor
        param = torch.nn.Parameter(torch.zeros(6, 8, dtype=torch.bfloat16), requires_grad=False)
        default_weight_loader(param, lazy)  # a torch method given the reader: the whole tensor
        assert torch.equal(param.data, w) and torch.equal(lazy.t(), w.t())
        assert torch.equal(torch.cat([lazy, lazy]), torch.cat([w, w]))
