import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ringlinear import RingLinearConfig, RingLinearForCausalLM
from ringlinear.checkpoint import CheckpointError, load_tokenizer


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = RingLinearForCausalLM(RingLinearConfig.preset("tiny", num_nextn_predict_layers=1)).eval()
    for router in m.routers():
        router.expert_bias.normal_()
    return m


def same_logits(a, b):
    ids = torch.randint(0, a.config.vocab_size, (2, 24))
    with torch.no_grad():
        return torch.equal(a(ids).logits, b(ids).logits)


def test_save_load_single_file(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    stored = load_file(tmp_path / "model.safetensors")
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in stored
    assert stored["model.layers.1.mlp.gate.expert_bias"].dtype == torch.float32
    loaded = RingLinearForCausalLM.from_pretrained(tmp_path)
    assert same_logits(model, loaded)
    assert torch.equal(loaded.routers()[0].expert_bias, model.routers()[0].expert_bias)


def test_save_load_sharded_bf16(model, tmp_path):
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_bytes=2_000_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and all((tmp_path / f).exists() for f in files)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = RingLinearForCausalLM.from_pretrained(tmp_path)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert loaded.routers()[0].expert_bias.dtype == torch.float32
    assert same_logits(model, loaded)


def test_engine_alias_for_the_routing_bias_loads(model, tmp_path):
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    bias = tensors.pop("model.layers.2.mlp.gate.expert_bias")
    tensors["model.layers.2.mlp.gate.e_score_correction_bias"] = bias
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = RingLinearForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.layers[2].mlp.gate.expert_bias, bias)


def edit_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_unexpected_and_misshapen_weights_are_named(model, tmp_path):
    model.save_pretrained(tmp_path)
    edit_weights(tmp_path, lambda t: t.pop("model.layers.3.attention.g_proj.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing weights \[model\.layers\.3\.attention\.g_proj\.weight\]"):
        RingLinearForCausalLM.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    edit_weights(tmp_path, lambda t: t.update({"model.layers.0.attention.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected weights \[model\.layers\.0\.attention\.extra\.weight\]"):
        RingLinearForCausalLM.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    edit_weights(tmp_path, lambda t: t.update({"model.norm.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight .* shape \[3\].* expects \[256\]"):
        RingLinearForCausalLM.from_pretrained(tmp_path)


def test_corrupt_and_absent_files(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        RingLinearForCausalLM.from_pretrained(tmp_path / "nowhere")
    model.config.save(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        RingLinearForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        RingLinearForCausalLM.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path, max_shard_bytes=2_000_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        RingLinearForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    for corrupt in ("{}", "garbage", ""):
        (tmp_path / "tokenizer.json").write_text(corrupt)
        with pytest.raises(ValueError, match=f"{tmp_path / 'tokenizer.json'} is not a valid tokenizer.json"):
            load_tokenizer(tmp_path)


def test_tied_embeddings_save_one_tensor(tmp_path):
    model = RingLinearForCausalLM(RingLinearConfig.preset("tiny", tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = RingLinearForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.word_embeddings.weight.data_ptr()
    assert same_logits(model, loaded)
