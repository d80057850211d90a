"""Synthesized checkpoints: config.json matches OpenGVLab's published InternVL3 configs, the
tokenizer knows the chat/image tokens, the remote-code config module loads in transformers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from internvl_batch import checkpoint

CHAT_AND_IMAGE_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                         "<IMG_CONTEXT>"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {p: checkpoint.synthesize(p, root / p) for p in ("tiny", "internvl3-1b")}


def _cfg(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_files(synth):
    for preset, path in synth.items():
        assert sorted(p.name for p in path.iterdir()) == [
            "config.json", "configuration_internvl_chat.py", "generation_config.json",
            "special_tokens_map.json", "synth.json", "tokenizer.json", "tokenizer_config.json"]
        assert checkpoint.is_synthesized(path)
        marker = json.loads((path / "synth.json").read_text())
        assert marker["preset"] == preset
        assert not list(path.glob("*.safetensors"))
    assert json.loads((synth["internvl3-1b"] / "synth.json").read_text())["mirrors"] == \
        "OpenGVLab/InternVL3-1B"


def test_internvl3_1b_matches_published_config(synth):
    cfg = _cfg(synth["internvl3-1b"])
    assert cfg["architectures"] == ["InternVLChatModel"]
    assert cfg["model_type"] == "internvl_chat"
    assert cfg["auto_map"]["AutoConfig"] == "configuration_internvl_chat.InternVLChatConfig"
    v = cfg["vision_config"]
    assert (v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"],
            v["intermediate_size"]) == (1024, 24, 16, 4096)
    assert (v["image_size"], v["patch_size"]) == (448, 14)
    assert v["norm_type"] == "layer_norm" and v["qk_normalization"] is False
    assert v["model_type"] == "intern_vit_6b" and v["architectures"] == ["InternVisionModel"]
    lm = cfg["llm_config"]
    assert lm["architectures"] == ["Qwen2ForCausalLM"] and lm["model_type"] == "qwen2"
    assert (lm["hidden_size"], lm["num_hidden_layers"], lm["num_attention_heads"],
            lm["num_key_value_heads"], lm["intermediate_size"]) == (896, 24, 14, 2, 4864)
    assert lm["vocab_size"] == 151674
    assert lm["rope_theta"] == 1e6
    assert lm["tie_word_embeddings"] is False and cfg["tie_word_embeddings"] is False
    assert (lm["bos_token_id"], lm["eos_token_id"]) == (151643, 151645)
    assert cfg["downsample_ratio"] == 0.5
    assert cfg["ps_version"] == "v2"
    assert cfg["template"] == "internvl2_5"
    assert (cfg["min_dynamic_patch"], cfg["max_dynamic_patch"]) == (1, 12)
    assert cfg["use_thumbnail"] is True and cfg["dynamic_image_size"] is True
    assert cfg["force_image_size"] == 448 and cfg["select_layer"] == -1
    assert cfg["hidden_size"] == 896
    gen = json.loads((synth["internvl3-1b"] / "generation_config.json").read_text())
    assert gen == {"eos_token_id": [151645, 151643], "do_sample": False}


@pytest.mark.parametrize("preset, shape", [
    ("internvl3-1b", (896, 24, 14, 2, 4864)),
    ("internvl3-2b", (1536, 28, 12, 2, 8960)),
    ("internvl3-8b", (3584, 28, 28, 4, 18944)),
])
def test_lm_shapes(preset, shape):
    cfg = checkpoint.config_copy(preset)
    lm = cfg["llm_config"]
    assert (lm["hidden_size"], lm["num_hidden_layers"], lm["num_attention_heads"],
            lm["num_key_value_heads"], lm["intermediate_size"]) == shape
    assert lm["vocab_size"] == 151674 and lm["tie_word_embeddings"] is False
    v = cfg["vision_config"]  # all three use InternViT-300M-448px-V2.5
    assert (v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"],
            v["intermediate_size"], v["image_size"], v["patch_size"]) == (1024, 24, 16, 4096,
                                                                          448, 14)
    assert cfg["max_dynamic_patch"] == 12 and cfg["hidden_size"] == shape[0]


def test_tiny_is_small_and_consistent(synth):
    cfg = _cfg(synth["tiny"])
    lm, v = cfg["llm_config"], cfg["vision_config"]
    assert lm["hidden_size"] // lm["num_attention_heads"] >= 32  # usable on vLLM's CPU backend
    assert lm["num_attention_heads"] % lm["num_key_value_heads"] == 0
    assert v["hidden_size"] % v["num_attention_heads"] == 0
    assert v["image_size"] % v["patch_size"] == 0 and cfg["force_image_size"] == v["image_size"]
    assert cfg["max_dynamic_patch"] == 4 and lm["vocab_size"] == 4096
    assert lm["tie_word_embeddings"] is False  # tied random embeddings: one caption for all


def test_lm_shape_validation():
    with pytest.raises(ValueError, match="not divisible"):
        checkpoint.LMShape(100, 2, 3, 1, 10, 100)
    with pytest.raises(ValueError, match="head_dim must be >= 32"):
        checkpoint.LMShape(64, 2, 4, 1, 10, 100)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        checkpoint.synthesize("huge", "/tmp/never-written")


@pytest.mark.parametrize("preset", ["tiny", "internvl3-1b"])
def test_tokenizer(synth, preset):
    from tokenizers import Tokenizer

    path = synth[preset]
    cfg = _cfg(path)
    vocab_size = cfg["llm_config"]["vocab_size"]
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = {}
    for t in CHAT_AND_IMAGE_TOKENS:
        ids[t] = tok.token_to_id(t)
        assert ids[t] is not None and ids[t] < vocab_size, t
        assert tok.encode(t).ids == [ids[t]], t  # one token, never split
    assert ids["<|im_end|>"] == cfg["llm_config"]["eos_token_id"]
    assert ids["<|endoftext|>"] == cfg["llm_config"]["bos_token_id"]
    first_special = min(ids.values())
    assert first_special == ids["<|endoftext|>"]
    if preset == "internvl3-1b":
        assert ids["<|endoftext|>"] == 151643 and ids["<|im_end|>"] == 151645  # Qwen2's ids
    # the vocab is populated up to the specials: every id decodes to something
    specials = checkpoint.SPECIAL_TOKENS + checkpoint.IMAGE_TOKENS
    last_special = first_special + len(specials) - 1
    assert tok.id_to_token(last_special) == specials[-1]
    assert sorted(tok.token_to_id(t) for t in specials) == list(range(first_special,
                                                                      last_special + 1))
    empty = [i for i in range(first_special) if tok.decode([i]) == ""]
    assert empty == []
    # ... and above them, up to vocab_size (the model's padding rows, which dummy weights emit)
    above = range(last_special + 1, vocab_size)
    assert len(above) > 0  # both presets leave such ids
    assert all(tok.id_to_token(i) is not None for i in above)
    empty = [i for i in above if tok.decode([i]) == ""]
    assert empty == []
    assert all(tok.decode([i]).strip() for i in above)  # not just a space
    assert tok.id_to_token(vocab_size) is None  # nothing beyond the model's vocab
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    # a filler is not a special: decoding with skip_special_tokens keeps it
    first_filler = last_special + 1
    assert tok.decode([first_filler], skip_special_tokens=True) == tok.decode([first_filler])
    assert tok.decode(list(above)).strip()  # a run of them decodes too
    # a rendered prompt keeps its markers as single tokens
    enc = tok.encode("<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nhi<|im_end|>")
    assert enc.ids[0] == ids["<|im_start|>"] and enc.ids[-1] == ids["<|im_end|>"]
    assert enc.ids.count(ids["<IMG_CONTEXT>"]) == 2
    tc = json.loads((path / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|im_end|>" and tc["pad_token"] == "<|endoftext|>"
    assert {int(k): v["content"] for k, v in tc["added_tokens_decoder"].items()}[
        ids["<IMG_CONTEXT>"]] == "<IMG_CONTEXT>"


def test_ensure_is_idempotent(tmp_path):
    a = checkpoint.ensure("tiny", tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    b = checkpoint.ensure("tiny", tmp_path)
    assert a == b == tmp_path / "tiny-weights"  # tiny's default: with weights
    assert {p.name: p.stat().st_mtime_ns for p in b.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-weights.lock", "tiny-weights"]


def test_ensure_writes_once_when_asked_at_once(tmp_path, monkeypatch):
    """Replicas resolving the same preset together: one draws the weights, the others wait."""
    import threading
    import time

    calls = []
    real = checkpoint.synthesize

    def slow(*a, **kw):
        calls.append(a)
        time.sleep(0.5)
        return real(*a, **kw)

    monkeypatch.setattr(checkpoint, "synthesize", slow)
    got = []
    threads = [threading.Thread(target=lambda: got.append(checkpoint.ensure("tiny", tmp_path)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and got == [tmp_path / "tiny-weights"] * 3


# -- the config module under transformers ----------------------------------------------------------

@pytest.fixture(scope="module")
def config_module(synth):
    pytest.importorskip("transformers")
    path = synth["internvl3-1b"] / "configuration_internvl_chat.py"
    spec = importlib.util.spec_from_file_location("ivb_test_configuration_internvl_chat", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_module_builds_and_round_trips(synth, config_module):
    cfg_json = _cfg(synth["internvl3-1b"])
    c = config_module.InternVLChatConfig(**cfg_json)
    assert type(c.llm_config).__name__ == "Qwen2Config"
    assert type(c.vision_config).__name__ == "InternVisionConfig"
    assert c.llm_config.hidden_size == 896 and c.llm_config.num_key_value_heads == 2
    assert c.vision_config.hidden_size == 1024 and c.vision_config.qk_normalization is False
    assert (c.downsample_ratio, c.ps_version, c.template, c.max_dynamic_patch,
            c.use_thumbnail, c.force_image_size) == (0.5, "v2", "internvl2_5", 12, True, 448)
    d = c.to_dict()
    assert d["model_type"] == "internvl_chat"
    assert isinstance(d["llm_config"], dict) and isinstance(d["vision_config"], dict)
    again = config_module.InternVLChatConfig(**d)
    assert again.to_dict() == d
    json.dumps(d, default=str)


def test_autoconfig_loads_synth_and_hash_is_stable(synth, config_module):
    from transformers import AutoConfig

    from internvl_batch import cache

    path = str(synth["internvl3-1b"])
    c = AutoConfig.from_pretrained(path, trust_remote_code=True)
    assert c.model_type == "internvl_chat" and c.llm_config.vocab_size == 151674
    text = cache.serialize_config(c)
    assert json.loads(text)["llm_config"]["hidden_size"] == 896
    h = cache.model_config_hash(path)
    assert len(h) == 16 and h == cache.model_config_hash(path)
    assert h != cache.model_config_hash(str(synth["tiny"]))


def test_model_config_hash_falls_back_to_config_text(tmp_path):
    pytest.importorskip("transformers")
    import hashlib

    from internvl_batch import cache

    text = json.dumps({"model_type": "certainly-not-a-model-type"})
    (tmp_path / "config.json").write_text(text)
    assert cache.model_config_hash(str(tmp_path)) == hashlib.sha256(text.encode()).hexdigest()[:16]


# -- weights ------------------------------------------------------------------------------------

def _layout(preset):
    return {t.name: t for t in checkpoint.weight_layout(checkpoint.PRESETS[preset])}


def test_weight_layout_names_and_shapes_tiny():
    """The names of OpenGVLab's InternVL3 checkpoints (vision_model / mlp1 / language_model),
    with shapes from the config; loading them in real vLLM is the full check
    (test_integration.py::test_synthesized_weights_give_per_image_captions)."""
    lay = _layout("tiny")
    cfg = checkpoint.config_copy("tiny")
    v, lm = cfg["vision_config"], cfg["llm_config"]
    c, h, vocab = v["hidden_size"], lm["hidden_size"], lm["vocab_size"]
    hd = h // lm["num_attention_heads"]
    expect = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "vision_model.embeddings.position_embedding": (1, (224 // 14) ** 2 + 1, c),
        "mlp1.0.weight": (4 * c,), "mlp1.0.bias": (4 * c,),
        "mlp1.1.weight": (h, 4 * c), "mlp1.1.bias": (h,),
        "mlp1.3.weight": (h, h), "mlp1.3.bias": (h,),
        "language_model.model.embed_tokens.weight": (vocab, h),
        "language_model.model.norm.weight": (h,),
        "language_model.lm_head.weight": (vocab, h),
    }
    for i in range(v["num_hidden_layers"]):
        b = f"vision_model.encoder.layers.{i}"
        expect.update({
            f"{b}.attn.qkv.weight": (3 * c, c), f"{b}.attn.qkv.bias": (3 * c,),
            f"{b}.attn.proj.weight": (c, c), f"{b}.attn.proj.bias": (c,),
            f"{b}.mlp.fc1.weight": (v["intermediate_size"], c),
            f"{b}.mlp.fc1.bias": (v["intermediate_size"],),
            f"{b}.mlp.fc2.weight": (c, v["intermediate_size"]), f"{b}.mlp.fc2.bias": (c,),
            f"{b}.norm1.weight": (c,), f"{b}.norm1.bias": (c,),
            f"{b}.norm2.weight": (c,), f"{b}.norm2.bias": (c,),
            f"{b}.ls1": (c,), f"{b}.ls2": (c,)})
    for i in range(lm["num_hidden_layers"]):
        b = f"language_model.model.layers.{i}"
        kv = lm["num_key_value_heads"] * hd
        expect.update({
            f"{b}.self_attn.q_proj.weight": (h, h), f"{b}.self_attn.q_proj.bias": (h,),
            f"{b}.self_attn.k_proj.weight": (kv, h), f"{b}.self_attn.k_proj.bias": (kv,),
            f"{b}.self_attn.v_proj.weight": (kv, h), f"{b}.self_attn.v_proj.bias": (kv,),
            f"{b}.self_attn.o_proj.weight": (h, h),
            f"{b}.mlp.gate_proj.weight": (lm["intermediate_size"], h),
            f"{b}.mlp.up_proj.weight": (lm["intermediate_size"], h),
            f"{b}.mlp.down_proj.weight": (h, lm["intermediate_size"]),
            f"{b}.input_layernorm.weight": (h,), f"{b}.post_attention_layernorm.weight": (h,)})
    assert {n: t.shape for n, t in lay.items()} == expect


def test_weight_layout_1b_size_and_tied_head():
    lay = _layout("internvl3-1b")
    # OpenGVLab lists InternVL3-1B at 0.9B parameters (InternViT-300M + Qwen2.5-0.5B)
    assert sum(t.numel for t in lay.values()) == 938_193_024
    assert lay["mlp1.1.weight"].shape == (896, 4096)
    assert lay["language_model.model.layers.23.self_attn.k_proj.weight"].shape == (128, 896)
    assert lay["language_model.lm_head.weight"].shape == (151674, 896)
    import dataclasses

    tied = dataclasses.replace(checkpoint.PRESETS["tiny"], lm=dataclasses.replace(
        checkpoint.PRESETS["tiny"].lm, tie_embeddings=True))
    names = {t.name for t in checkpoint.weight_layout(tied)}
    assert "language_model.lm_head.weight" not in names  # vLLM skips it when tied
    assert names == set(_layout("tiny")) - {"language_model.lm_head.weight"}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return checkpoint.synthesize("tiny", tmp_path_factory.mktemp("w") / "tiny", weights=True)


def test_weights_statistics(tiny_weights):
    import torch
    from safetensors.torch import load_file

    assert sorted(p.name for p in tiny_weights.glob("model*")) == ["model.safetensors"]
    got = load_file(str(tiny_weights / "model.safetensors"))
    lay = _layout("tiny")
    assert set(got) == set(lay)
    resid_v, resid_lm = 0.02 / (2 * 2) ** 0.5, 0.02 / (2 * 2) ** 0.5  # 2 layers each
    for name, t in lay.items():
        x = got[name]
        assert x.dtype == torch.bfloat16 and tuple(x.shape) == t.shape, name
        x = x.float()
        if name.endswith(("norm.weight", "layernorm.weight", "norm1.weight", "norm2.weight",
                          "mlp1.0.weight")):
            assert torch.equal(x, torch.ones_like(x)), name
        elif name.endswith("bias"):
            assert torch.equal(x, torch.zeros_like(x)), name
        elif name.endswith((".ls1", ".ls2")):
            assert torch.allclose(x, torch.full_like(x, 0.1), rtol=1e-2), name
        else:
            want = resid_lm if name.endswith(("o_proj.weight", "down_proj.weight")) else \
                resid_v if name.endswith(("attn.proj.weight", "fc2.weight")) else 0.02
            assert t.init == "normal" and t.std == pytest.approx(want), name
            tol = 4 / (2 * x.numel()) ** 0.5  # ~4 standard errors of a sample std
            assert abs(x.std().item() / want - 1) < tol + 0.01, (name, x.std().item())
            assert abs(x.mean().item()) < 4 * want / x.numel() ** 0.5 + 1e-4, name
    # distinct tensors are independent draws, not one stream reused
    a, b = got["language_model.model.embed_tokens.weight"], got["language_model.lm_head.weight"]
    assert not torch.equal(a, b)
    marker = json.loads((tiny_weights / "synth.json").read_text())["weights"]
    assert marker["files"] == ["model.safetensors"] and marker["seed"] == checkpoint.WEIGHTS_SEED
    assert marker["params"] == sum(t.numel for t in lay.values())
    assert marker["bytes"] == (tiny_weights / "model.safetensors").stat().st_size - \
        _header_bytes(tiny_weights / "model.safetensors")


def _header_bytes(path: Path) -> int:
    import struct

    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_weights_are_reproducible_and_seeded(tiny_weights, tmp_path):
    from safetensors.torch import load_file

    again = checkpoint.write_weights("tiny", tmp_path / "same")
    assert (tmp_path / "same" / "model.safetensors").read_bytes() == \
        (tiny_weights / "model.safetensors").read_bytes()
    assert again["scheme"] == checkpoint.WEIGHTS_SCHEME
    checkpoint.write_weights("tiny", tmp_path / "other", seed=1)
    x = load_file(str(tmp_path / "other" / "model.safetensors"))
    y = load_file(str(tiny_weights / "model.safetensors"))
    assert not (x["mlp1.1.weight"] == y["mlp1.1.weight"]).all()


def test_weights_shard_with_an_index(tiny_weights, tmp_path):
    from safetensors import safe_open

    desc = checkpoint.write_weights("tiny", tmp_path, shard_bytes=600_000)
    n = len(desc["files"])
    assert n >= 3 and desc["files"][0] == f"model-00001-of-{n:05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == desc["bytes"]
    assert set(index["weight_map"]) == set(_layout("tiny"))
    seen = {}
    for f in desc["files"]:
        with safe_open(str(tmp_path / f), "pt") as st:
            for k in st.keys():
                seen[k] = f
                # the same tensor as in the one-file checkpoint: drawn by name, not by order
                with safe_open(str(tiny_weights / "model.safetensors"), "pt") as one:
                    assert (st.get_tensor(k) == one.get_tensor(k)).all(), k
    assert seen == index["weight_map"]


def test_weights_marker_parse_and_ensure(tiny_weights, synth, tmp_path):
    assert checkpoint.weights_id(tiny_weights) == \
        f"{checkpoint.WEIGHTS_SCHEME}-seed0-bfloat16"
    assert checkpoint.has_weights(tiny_weights)
    assert not checkpoint.has_weights(synth["tiny"]) and checkpoint.weights_id(synth["tiny"]) is None
    assert not checkpoint.has_weights("OpenGVLab/InternVL3-1B")
    assert checkpoint.parse_preset("tiny") == ("tiny", True)
    assert checkpoint.parse_preset("tiny+dummy") == ("tiny", False)
    assert checkpoint.parse_preset("internvl3-1b") == ("internvl3-1b", False)
    assert checkpoint.parse_preset("internvl3-1b+weights") == ("internvl3-1b", True)
    with pytest.raises(ValueError, match="must be \\+weights or \\+dummy"):
        checkpoint.parse_preset("tiny+real")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        checkpoint.parse_preset("huge+weights")
    w = checkpoint.ensure("tiny", tmp_path)
    d = checkpoint.ensure("tiny", tmp_path, weights=False)
    assert (w.name, d.name) == ("tiny-weights", "tiny")
    assert checkpoint.has_weights(w) and not checkpoint.has_weights(d)
    assert not list(d.glob("*.safetensors"))


def test_large_vocab_tokenizer_loads_without_the_mistral_regex_warning(tmp_path, capfd):
    """transformers (>100k vocab, no transformers_version in config.json) takes our synthesized
    tokenizer for a Mistral one and warns on every start; OpenGVLab's configs carry
    the version, and so do ours."""
    from transformers import AutoTokenizer

    path = checkpoint.synthesize("internvl3-1b", tmp_path / "m")
    capfd.readouterr()
    AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    assert "incorrect regex pattern" not in "".join(capfd.readouterr())
