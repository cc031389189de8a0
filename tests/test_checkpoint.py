"""Checkpoint I/O: both directions with transformers, sharding, tied/untied, key layouts, config layouts, errors."""

import json

import pytest
import torch
from oracle import hf_model, pixels, prompt, tiny_config
from safetensors.torch import load_file, save_file

from qwen2vl import Qwen2VL, Qwen2VLConfig
from qwen2vl.config import preset

IDS = torch.tensor([prompt(4, ("image", 1, 4, 4), 3)])
PV, GRID = pixels([(1, 4, 4)])


def logits(model):
    with torch.no_grad():
        out = model(IDS, pixel_values=PV, image_grid_thw=GRID)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.hf
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_transformers_checkpoint_loads_into_ours(tmp_path, tied, shard):
    hf = hf_model(tiny_config(tied=tied), seed=3)
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = Qwen2VL.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    torch.testing.assert_close(logits(ours), logits(hf), rtol=1e-4, atol=1e-5)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied


@pytest.mark.hf
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard", ["5GB", "30KB"])
def test_our_checkpoint_loads_into_transformers(tmp_path, tied, shard):
    from transformers import Qwen2VLForConditionalGeneration

    ours = Qwen2VL.from_config(Qwen2VLConfig.from_dict(tiny_config(tied=tied)), seed=0)
    ours.save_pretrained(tmp_path, max_shard_size=shard)
    keys = set()
    for f in tmp_path.glob("*.safetensors"):
        keys |= set(load_file(f))
        assert f.stat().st_mode & 0o044 == 0o044, f"{f.name} is not readable by others"
    assert ("lm_head.weight" in keys) != tied
    assert all(k.startswith(("visual.", "model.", "lm_head.")) for k in keys)
    assert not any(k.startswith(("model.visual.", "model.language_model.")) for k in keys)
    flat = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" not in flat and flat["rope_scaling"]["type"] == "mrope"
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    torch.testing.assert_close(logits(hf), logits(ours), rtol=1e-4, atol=1e-5)
    # and back: save -> load is bit-exact
    again = Qwen2VL.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_new_key_prefixes_load(tmp_path):
    ours = Qwen2VL.from_config(Qwen2VLConfig.from_dict(tiny_config()), seed=1)
    ours.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    renamed = {("model." + k if k.startswith("visual.") else
                "model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in state.items()}
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    torch.testing.assert_close(logits(Qwen2VL.from_pretrained(tmp_path)), logits(ours), rtol=0, atol=0)


def nested_v4(flat: dict) -> dict:
    text = {k: v for k, v in flat.items() if k not in ("vision_config", "image_token_id", "video_token_id",
                                                         "vision_start_token_id", "vision_end_token_id",
                                                         "architectures", "model_type")}
    return {"model_type": "qwen2_vl", "text_config": text, "vision_config": flat["vision_config"],
            **{k: flat[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                    "vision_end_token_id")}}


def nested_v5(flat: dict) -> dict:
    cfg = nested_v4(flat)
    text = cfg["text_config"]
    theta = text.pop("rope_theta")
    section = text.pop("rope_scaling")["mrope_section"]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, "mrope_section": section}
    cfg["tie_word_embeddings"] = text.pop("tie_word_embeddings")
    cfg["dtype"] = text.pop("torch_dtype")
    return cfg


@pytest.mark.parametrize("layout", [nested_v4, nested_v5])
def test_nested_config_layouts_read_the_same(layout):
    flat = tiny_config(tied=True, rope_theta=5000.0)
    a, b = Qwen2VLConfig.from_dict(flat), Qwen2VLConfig.from_dict(layout(flat))
    assert a.text == b.text and a.vision == b.vision
    assert b.text.rope_theta == 5000.0 and b.text.tie_word_embeddings and b.text.mrope_section == [2, 3, 3]
    assert a.torch_dtype == b.torch_dtype == "float32"


def test_config_round_trip_keeps_unknown_keys():
    flat = tiny_config()
    flat["custom_field"] = {"x": 1}
    config = Qwen2VLConfig.from_dict(flat)
    again = Qwen2VLConfig.from_dict(config.to_dict())
    assert again == config and again.to_dict()["custom_field"] == {"x": 1}


def test_presets_have_the_released_shapes():
    two, seven = preset("qwen2-vl-2b"), preset("qwen2-vl-7b")
    assert (two.text.hidden_size, two.text.num_key_value_heads, two.text.vocab_size) == (1536, 2, 151936)
    assert two.text.tie_word_embeddings and not seven.text.tie_word_embeddings
    assert (seven.text.hidden_size, seven.text.intermediate_size, seven.vision.hidden_size) == (3584, 18944, 3584)
    assert preset("qwen2-vl-72b").text.num_hidden_layers == 80
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen2VL(two).parameters())
    assert n == 2_208_985_600  # spec 11.1


# ----------------------------------------------------------------------------------- errors
@pytest.fixture
def saved(tmp_path):
    ours = Qwen2VL.from_config(Qwen2VLConfig.from_dict(tiny_config()), seed=2)
    ours.save_pretrained(tmp_path)
    return tmp_path


def rewrite(path, fn):
    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_key_is_named(saved):
    rewrite(saved, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight"):
        Qwen2VL.from_pretrained(saved)


def test_unexpected_key_is_named(saved):
    rewrite(saved, lambda s: s.update({"visual.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected keys: visual\.extra\.weight \(model\.safetensors\)"):
        Qwen2VL.from_pretrained(saved)


def test_misshaped_key_is_named(saved):
    rewrite(saved, lambda s: s.update({"model.norm.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"mis-shaped keys: model\.norm\.weight: file \(3,\) vs model \(64,\)"):
        Qwen2VL.from_pretrained(saved)


def test_absent_files_and_directories_are_named(saved, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        Qwen2VL.from_pretrained(saved / "nope")
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        Qwen2VL.from_pretrained(saved)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        Qwen2VL.from_pretrained(empty)


def test_missing_shard_is_named(tmp_path):
    Qwen2VL.from_config(Qwen2VLConfig.from_dict(tiny_config()), seed=2).save_pretrained(tmp_path, max_shard_size="30KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        Qwen2VL.from_pretrained(tmp_path)


def test_unknown_dtype_is_named(saved):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        Qwen2VL.from_pretrained(saved, dtype="float8")


def test_dtype_and_device_arguments(saved):
    model = Qwen2VL.from_pretrained(saved, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())


def test_saving_leaves_the_live_config_alone(saved, tmp_path_factory):
    model = Qwen2VL.from_pretrained(saved, dtype="float32")
    before = model.config.to_dict()
    out = tmp_path_factory.mktemp("bf16")
    model.to(torch.bfloat16).save_pretrained(out)
    assert model.config.to_dict() == before  # the file says bfloat16; the object was not written into
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
