"""online/adapters.py: a saved folder loads in PEFT over a tiny HF Llama; prune plan."""

from __future__ import annotations

import json

import torch

from alchemist_sgl.online.adapters import (load_adapter, load_adapter_config, prune_plan,
                                           save_adapter)
from alchemist_sgl.train.lora import LoraAdapter, peft_name
from alchemist_sgl.train.spec import LlamaSpec

HF = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def trained_adapter(rank: int = 4) -> LoraAdapter:
    from transformers import LlamaConfig
    adapter = LoraAdapter(LlamaSpec.from_hf_config(LlamaConfig(**HF)), rank=rank, alpha=8.0)
    with torch.no_grad():
        for b in adapter.b.values():  # non-zero B so "equal" is not trivially zeros
            b.normal_(generator=torch.Generator().manual_seed(1))
    return adapter


def test_saved_folder_loads_in_peft_with_equal_weights(tmp_path):
    import peft  # a dev dependency: missing, this test fails instead of skipping
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path / "base"  # a local model folder: PEFT then never looks the name up online
    LlamaConfig(**HF).save_pretrained(base)
    adapter = trained_adapter()
    state = adapter.peft_state_dict()
    assert peft_name(0, "q", "A") in state
    opt = {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.ones(3)}},
           "param_groups": [{"lr": 1e-4, "params": [0]}]}
    folder = save_adapter(tmp_path / "adapters" / "v3", state, adapter.peft_config_dict(), opt,
                          base_model=str(base))
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json",
                                                        "adapter_model.safetensors",
                                                        "optimizer.pt"]
    assert [p.name for p in folder.parent.iterdir()] == ["v3"]  # no tmp folder left
    assert load_adapter_config(folder)["base_model_name_or_path"] == str(base)

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HF))
    peft_model = peft.PeftModel.from_pretrained(model, str(folder))
    loaded = peft.get_peft_model_state_dict(peft_model)
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    lin = peft_model.base_model.model.model.layers[1].mlp.down_proj
    assert torch.equal(lin.lora_B["default"].weight, state[peft_name(1, "down", "B")])
    assert lin.scaling["default"] == adapter.scale

    got_state, got_opt = load_adapter(folder)
    assert got_state.keys() == state.keys()
    assert all(torch.equal(got_state[k], v) for k, v in state.items())
    assert torch.equal(got_opt["state"][0]["exp_avg"], torch.ones(3))


def test_save_replaces_an_existing_folder_and_optimizer_is_optional(tmp_path):
    a = {"x.lora_A.weight": torch.zeros(2, 3)}
    save_adapter(tmp_path / "v1", a, {"r": 2}, {"state": {}}, base_model="m")
    b = {"x.lora_A.weight": torch.ones(2, 3)}
    save_adapter(tmp_path / "v1", b, {"r": 2}, None, base_model="m")
    got, opt = load_adapter(tmp_path / "v1")
    assert torch.equal(got["x.lora_A.weight"], torch.ones(2, 3)) and opt is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]
    assert json.loads((tmp_path / "v1" / "adapter_config.json").read_text()) == {
        "r": 2, "base_model_name_or_path": "m"}


def test_prune_plan_keeps_last_every_and_protected():
    ids = list(range(0, 23))
    drop = prune_plan(ids, keep_last=5, keep_every=10, protected={3})
    assert drop == set(ids) - {18, 19, 20, 21, 22} - {0, 10, 20} - {3}
    assert prune_plan([], 5, 10, set()) == set()
    assert prune_plan([1, 2], keep_last=5, keep_every=10, protected=set()) == set()
    assert prune_plan([7, 1, 4], keep_last=1, keep_every=100, protected={99}) == {1, 4}
