"""Synthesized InternVL checkpoints: real architectures, random weights.

No weights can be downloaded on the hosts this runs on, and benchmarks only need the compute
shape, so we write the directory a real OpenGVLab InternVL3 checkpoint has: ``config.json``
mirroring the published configs, the config module that ``trust_remote_code`` imports through
``auto_map``, and a byte-level BPE tokenizer that knows the chat and image tokens.

Weights come in two kinds. Without safetensors vLLM loads the directory with
``load_format="dummy"``: every parameter, norms included, drawn from U(±0.001), so logits are
nearly flat and every image gets the same caption. With ``weights=True`` we also write
``model.safetensors`` (sharded above `SHARD_BYTES`, with the index vLLM reads) drawn at the
scales of a freshly initialised trained model (`weight_layout`), so outputs depend on the
input and compiled-vs-eager comparisons compare something. A ``synth.json`` marker records
which kind a directory holds; the engine picks the load format from it.
"""
from __future__ import annotations

import copy
import json
import os
import string
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                "<box>", "</box>"]
SYNTH_MARKER = "synth.json"
WEIGHTS_SEED = 0
# bump when weight_layout's scales change: it is part of the compile-cache key
WEIGHTS_SCHEME = "normal0.02-v1"
SHARD_BYTES = 4 * 2**30


@dataclass(frozen=True)
class LMShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"LM hidden {self.hidden} is not divisible by {self.heads} heads")
        if self.hidden // self.heads < 32:
            # vLLM's CPU attention refuses head_dim 16; keep every preset usable on CPU
            raise ValueError("LM head_dim must be >= 32")


@dataclass(frozen=True)
class VitShape:
    hidden: int
    layers: int
    heads: int
    mlp: int
    image_size: int = 448
    patch: int = 14
    norm_type: str = "layer_norm"
    qk_normalization: bool = False
    qkv_bias: bool = True
    initializer_factor: float = 1.0  # InternViT's initial layer scale ls1/ls2


@dataclass(frozen=True)
class Preset:
    name: str
    real_name: str
    vit: VitShape
    lm: LMShape
    max_dynamic_patch: int = 12
    weights: bool = False  # what `preset:NAME` (no +weights/+dummy) gets


_VIT_300M = VitShape(hidden=1024, layers=24, heads=16, mlp=4096)
# InternViT-6B-448px-V2_5, the encoder of InternVL3-38B and 78B (the config of its V1-5
# predecessor, same architecture: huggingface.co/OpenGVLab/InternViT-6B-448px-V1-5)
_VIT_6B = VitShape(hidden=3200, layers=45, heads=25, mlp=12800, norm_type="rms_norm",
                   qk_normalization=True, qkv_bias=False, initializer_factor=0.1)
PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", "tiny (CPU tests)",
                   VitShape(hidden=64, layers=2, heads=4, mlp=128, image_size=224),
                   # untied: with tied random embeddings the argmax at every step is the
                   # input token itself, so all 17 sample images got one caption (measured);
                   # untied, 15 of 17 differ. InternVL3-1B/2B/8B are untied too.
                   LMShape(hidden=128, layers=2, heads=2, kv_heads=1, mlp=256, vocab=4096),
                   max_dynamic_patch=4, weights=True),
    "internvl3-1b": Preset("internvl3-1b", "OpenGVLab/InternVL3-1B", _VIT_300M,
                           LMShape(896, 24, 14, 2, 4864, 151674)),
    "internvl3-2b": Preset("internvl3-2b", "OpenGVLab/InternVL3-2B", _VIT_300M,
                           LMShape(1536, 28, 12, 2, 8960, 151674)),
    "internvl3-8b": Preset("internvl3-8b", "OpenGVLab/InternVL3-8B", _VIT_300M,
                           LMShape(3584, 28, 28, 4, 18944, 151674)),
    # the language models of the larger ones: Qwen2.5-14B, -32B and -72B (40/40/64 heads, 8 KV
    # heads each), with InternVL3's vocabulary
    "internvl3-14b": Preset("internvl3-14b", "OpenGVLab/InternVL3-14B", _VIT_300M,
                            LMShape(5120, 48, 40, 8, 13824, 151674)),
    "internvl3-38b": Preset("internvl3-38b", "OpenGVLab/InternVL3-38B", _VIT_6B,
                            LMShape(5120, 64, 40, 8, 27648, 151674)),
    "internvl3-78b": Preset("internvl3-78b", "OpenGVLab/InternVL3-78B", _VIT_6B,
                            LMShape(8192, 80, 64, 8, 29568, 151674)),
    # InternVL3-38B's encoder with the smallest LM: Qwen2-0.5B shapes (the projector maps
    # 4 x 3200 to any LM width)
    "internvit-6b": Preset("internvit-6b", "OpenGVLab/InternVL3-38B vision encoder + 0.5B LM",
                           _VIT_6B, LMShape(896, 24, 14, 2, 4864, 151674)),
}


def build_config(p: Preset) -> dict:
    """config.json in the shape OpenGVLab publishes for InternVL3."""
    lm, vit = p.lm, p.vit
    # InternVL3 places the ids right after Qwen2's 151643 base vocab; scaled down for tiny
    base = lm.vocab - 31 if lm.vocab < 151674 else 151643
    llm_config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": lm.hidden, "num_hidden_layers": lm.layers,
        "num_attention_heads": lm.heads, "num_key_value_heads": lm.kv_heads,
        "intermediate_size": lm.mlp, "vocab_size": lm.vocab, "hidden_act": "silu",
        "max_position_embeddings": 32768, "max_window_layers": 70, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": None, "sliding_window": 32768,
        "use_sliding_window": False, "use_cache": True,
        "tie_word_embeddings": lm.tie_embeddings, "attention_dropout": 0.0,
        "bos_token_id": base, "eos_token_id": base + 2, "torch_dtype": "bfloat16",
    }
    vision_config = {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
        "hidden_size": vit.hidden, "num_hidden_layers": vit.layers,
        "num_attention_heads": vit.heads, "intermediate_size": vit.mlp,
        "image_size": vit.image_size, "patch_size": vit.patch, "num_channels": 3,
        "hidden_act": "gelu", "norm_type": vit.norm_type, "layer_norm_eps": 1e-6,
        "qk_normalization": vit.qk_normalization, "qkv_bias": vit.qkv_bias, "use_flash_attn": True,
        "dropout": 0.0, "drop_path_rate": 0.0, "attention_dropout": 0.0,
        "initializer_factor": vit.initializer_factor, "initializer_range": 0.02,
        "torch_dtype": "bfloat16",
    }
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1,
        "force_image_size": vit.image_size, "dynamic_image_size": True, "use_thumbnail": True,
        "min_dynamic_patch": 1, "max_dynamic_patch": p.max_dynamic_patch,
        "template": "internvl2_5", "hidden_size": lm.hidden,
        "use_backbone_lora": 0, "use_llm_lora": 0, "image_fold": None,
        "torch_dtype": "bfloat16", "tie_word_embeddings": lm.tie_embeddings,
        "llm_config": llm_config, "vision_config": vision_config,
        # as OpenGVLab's checkpoints carry it; without it transformers takes the tokenizer for
        # a Mistral one and warns of an "incorrect regex pattern" on every start
        "transformers_version": "4.37.2",
    }


# The config module trust_remote_code imports. It mirrors OpenGVLab's
# configuration_internvl_chat.py closely enough for vLLM's InternVL implementation.
CONFIG_MODULE = '''\
"""InternVL chat config (written by internvl-batch; mirrors OpenGVLab's remote code)."""
import copy

from transformers import LlamaConfig, PretrainedConfig, Qwen2Config


class InternVisionConfig(PretrainedConfig):
    model_type = "intern_vit_6b"

    def __init__(self, num_channels=3, patch_size=14, image_size=448, qkv_bias=False,
                 hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
                 qk_normalization=False, num_hidden_layers=24, use_flash_attn=True,
                 hidden_act="gelu", norm_type="layer_norm", layer_norm_eps=1e-6, dropout=0.0,
                 drop_path_rate=0.0, attention_dropout=0.0, initializer_range=0.02,
                 initializer_factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qk_normalization = qk_normalization
        self.num_hidden_layers = num_hidden_layers
        self.use_flash_attn = use_flash_attn
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, use_backbone_lora=0,
                 use_llm_lora=0, select_layer=-1, force_image_size=None, downsample_ratio=0.5,
                 template=None, dynamic_image_size=False, use_thumbnail=False, ps_version="v1",
                 min_dynamic_patch=1, max_dynamic_patch=6, **kwargs):
        super().__init__(**kwargs)
        vision_config = vision_config or {}
        llm_config = llm_config or {"architectures": ["Qwen2ForCausalLM"]}
        if isinstance(vision_config, PretrainedConfig):
            vision_config = vision_config.to_dict()
        if isinstance(llm_config, PretrainedConfig):
            llm_config = llm_config.to_dict()
        self.vision_config = InternVisionConfig(**vision_config)
        arch = (llm_config.get("architectures") or ["Qwen2ForCausalLM"])[0]
        self.llm_config = (LlamaConfig if arch == "LlamaForCausalLM" else Qwen2Config)(**llm_config)
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch

    def to_dict(self):
        output = copy.deepcopy(self.__dict__)
        output["vision_config"] = self.vision_config.to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        output["model_type"] = self.__class__.model_type
        return output
'''


def _filler_tokens(n: int, taken: set[str]):
    """Yield n decodable filler tokens for ids the trained BPE did not reach.

    Dummy weights emit ids across the whole vocab; every id must decode to something, so
    the vocabulary is padded with short lowercase strings (valid byte-level symbols).
    """
    count = 0
    if n <= 0:
        return
    for length in range(2, 6):
        for letters in product(string.ascii_lowercase, repeat=length):
            tok = "".join(letters)
            if count % 3 == 0:
                tok = "\u0120" + tok  # byte-level space prefix: decoded text gets word breaks
            if tok in taken:
                continue
            yield tok
            count += 1
            if count == n:
                return


def build_tokenizer(vocab_size: int, out: Path) -> dict[str, int]:
    """Train a small byte-level BPE, pad it to the model's vocab, append the special tokens.

    Returns the special token ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = SPECIAL_TOKENS + IMAGE_TOKENS
    base = vocab_size - 31 if vocab_size < 151674 else 151643
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(2000, base), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    state = json.loads(tok.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    for t in _filler_tokens(base - len(vocab), set(vocab)):
        vocab[t] = len(vocab)
    state["added_tokens"] = [
        {"id": base + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(specials)
    ]
    out.mkdir(parents=True, exist_ok=True)
    ids = {t: base + i for i, t in enumerate(specials)}
    # `tokenizers` renumbers added tokens that are missing from the model vocab, so the
    # specials must sit in the vocab at their own ids, or they drift past the fillers
    vocab.update(ids)
    # ids between the last special and vocab_size (the model's padding rows) must decode too
    top = base + len(specials)
    for i, t in enumerate(_filler_tokens(vocab_size - top, set(vocab))):
        vocab[t] = top + i
    (out / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "clean_up_tokenization_spaces": False,
        "additional_special_tokens": specials[1:],
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False,
                                          "rstrip": False, "normalized": False,
                                          "single_word": False} for t, i in ids.items()},
        "chat_template": (
            "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
            "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "additional_special_tokens": specials[1:]}, indent=2))
    return ids


def _corpus():
    from .sources import sample_captions

    lines = sample_captions()
    words = ("a photo of the man woman cat dog person sitting standing on in with and near "
             "street table food plate building sky water tree car bus train red blue green "
             "white black small large two three group people picture image shows").split()
    for i in range(400):
        yield " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12))
    yield from lines


# -- weights ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor: its name as OpenGVLab's InternVL checkpoints spell it (which
    vLLM's InternVL loader maps onto its modules), shape, and how it is drawn."""
    name: str
    shape: tuple[int, ...]
    init: str  # "normal" (std), "ones", "zeros", "const" (std holds the value)
    std: float = 0.0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def weight_layout(p: Preset) -> list[Tensor]:
    """Every tensor of a real InternVL3 checkpoint for `p`, with trained-like init scales.

    Names and shapes follow OpenGVLab's remote code (``vision_model`` = InternVisionModel,
    ``mlp1`` = the projector Sequential(LayerNorm, Linear, GELU, Linear), ``language_model`` =
    Qwen2ForCausalLM); vLLM's loader refuses a checkpoint with a missing or unknown name, so
    loading it with ``load_format="auto"`` checks this list (tests/test_checkpoint.py).
    Scales: matrices, embeddings and the ViT's class/position embeddings N(0, 0.02); the
    projections into the residual stream N(0, 0.02/sqrt(2·layers)) as GPT-2 initialises them,
    so the stream does not grow with depth; norm weights 1, biases 0; InternViT's layer scales
    (ls1, ls2) 0.1, the order of magnitude trained InternViT checkpoints carry.
    """
    cfg = build_config(p)
    v, lm = cfg["vision_config"], cfg["llm_config"]
    out: list[Tensor] = []

    def normal(name, *shape, std=0.02):
        out.append(Tensor(name, tuple(shape), "normal", std))

    def norm(name, dim, bias=True):
        out.append(Tensor(f"{name}.weight", (dim,), "ones"))
        if bias:
            out.append(Tensor(f"{name}.bias", (dim,), "zeros"))

    def linear(name, n_out, n_in, bias=True, std=0.02):
        normal(f"{name}.weight", n_out, n_in, std=std)
        if bias:
            out.append(Tensor(f"{name}.bias", (n_out,), "zeros"))

    c, patch, layers = v["hidden_size"], v["patch_size"], v["num_hidden_layers"]
    ln_bias = v.get("norm_type", "layer_norm") == "layer_norm"  # RMSNorm has no bias
    e = "vision_model.embeddings"
    normal(f"{e}.class_embedding", 1, 1, c)
    normal(f"{e}.patch_embedding.weight", c, v.get("num_channels", 3), patch, patch)
    out.append(Tensor(f"{e}.patch_embedding.bias", (c,), "zeros"))
    normal(f"{e}.position_embedding", 1, (v["image_size"] // patch) ** 2 + 1, c)
    resid = 0.02 / (2 * layers) ** 0.5
    for i in range(layers):
        b = f"vision_model.encoder.layers.{i}"
        linear(f"{b}.attn.qkv", 3 * c, c, bias=bool(v.get("qkv_bias", True)))
        if v.get("qk_normalization"):
            norm(f"{b}.attn.q_norm", c, bias=False)
            norm(f"{b}.attn.k_norm", c, bias=False)
        linear(f"{b}.attn.proj", c, c, std=resid)
        linear(f"{b}.mlp.fc1", v["intermediate_size"], c)
        linear(f"{b}.mlp.fc2", c, v["intermediate_size"], std=resid)
        norm(f"{b}.norm1", c, ln_bias)
        norm(f"{b}.norm2", c, ln_bias)
        out.append(Tensor(f"{b}.ls1", (c,), "const", 0.1))
        out.append(Tensor(f"{b}.ls2", (c,), "const", 0.1))

    h = lm["hidden_size"]
    shuffled = c * int(1 / cfg["downsample_ratio"]) ** 2  # pixel shuffle folds 2x2 patches
    norm("mlp1.0", shuffled)
    linear("mlp1.1", h, shuffled)
    linear("mlp1.3", h, h)

    heads, kv, n = lm["num_attention_heads"], lm["num_key_value_heads"], lm["num_hidden_layers"]
    hd = h // heads
    resid = 0.02 / (2 * n) ** 0.5
    m = "language_model.model"
    normal(f"{m}.embed_tokens.weight", lm["vocab_size"], h)
    for i in range(n):
        b = f"{m}.layers.{i}"
        linear(f"{b}.self_attn.q_proj", heads * hd, h)  # Qwen2: q/k/v carry biases, o not
        linear(f"{b}.self_attn.k_proj", kv * hd, h)
        linear(f"{b}.self_attn.v_proj", kv * hd, h)
        linear(f"{b}.self_attn.o_proj", h, heads * hd, bias=False, std=resid)
        linear(f"{b}.mlp.gate_proj", lm["intermediate_size"], h, bias=False)
        linear(f"{b}.mlp.up_proj", lm["intermediate_size"], h, bias=False)
        linear(f"{b}.mlp.down_proj", h, lm["intermediate_size"], bias=False, std=resid)
        norm(f"{b}.input_layernorm", h, bias=False)
        norm(f"{b}.post_attention_layernorm", h, bias=False)
    norm(f"{m}.norm", h, bias=False)
    if not lm["tie_word_embeddings"]:  # tied: vLLM reuses embed_tokens and skips lm_head
        normal("language_model.lm_head.weight", lm["vocab_size"], h)
    return out


def _draw(t: Tensor, seed: int, dtype):
    """One tensor, reproducible by name alone (so shards can be drawn in any order)."""
    import zlib

    import torch

    if t.init == "ones":
        return torch.ones(t.shape, dtype=dtype)
    if t.init == "zeros":
        return torch.zeros(t.shape, dtype=dtype)
    if t.init == "const":
        return torch.full(t.shape, t.std, dtype=dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(t.name.encode()))
    x = torch.randn(t.shape, generator=g, dtype=torch.float32)
    return x.mul_(t.std).to(dtype)


def write_weights(preset: str, out: str | os.PathLike, *, seed: int = WEIGHTS_SEED,
                  dtype: str = "bfloat16", shard_bytes: int = SHARD_BYTES) -> dict:
    """Write `preset`'s weights into `out` as safetensors; return their description.

    One ``model.safetensors`` up to `shard_bytes`, above that ``model-0000k-of-0000n``
    shards and ``model.safetensors.index.json`` (the layout Hugging Face writes and vLLM
    reads). Shards are drawn one at a time, so memory peaks near one shard.
    """
    import torch
    from safetensors.torch import save_file

    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
              "float32": torch.float32}[dtype]
    width = torch.tensor([], dtype=tdtype).element_size()
    layout = weight_layout(PRESETS[preset])
    shards: list[list[Tensor]] = [[]]
    size = 0
    for t in layout:
        if shards[-1] and size + t.numel * width > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.numel * width
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else \
        [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, shard in zip(names, shards):
        save_file({t.name: _draw(t, seed, tdtype) for t in shard}, str(out / name),
                  metadata={"format": "pt"})
    total = sum(t.numel for t in layout) * width
    if n > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total},
             "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}},
            indent=2))
    return {"scheme": WEIGHTS_SCHEME, "seed": seed, "dtype": dtype, "files": names,
            "params": sum(t.numel for t in layout), "bytes": total}


def synthesize(preset: str, out: str | os.PathLike, *, weights: bool = False,
               seed: int = WEIGHTS_SEED) -> Path:
    """Write a loadable InternVL checkpoint for `preset` into `out`, with random weights
    (`write_weights`) if `weights`, else none (vLLM then needs ``load_format="dummy"``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = build_config(p)
    ids = build_tokenizer(p.lm.vocab, out)
    cfg["llm_config"]["eos_token_id"] = ids["<|im_end|>"]
    cfg["llm_config"]["bos_token_id"] = ids["<|endoftext|>"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "configuration_internvl_chat.py").write_text(CONFIG_MODULE)
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "do_sample": False}))
    desc = write_weights(preset, out, seed=seed) if weights else \
        "none (load with load_format='dummy')"
    # the marker goes last: a directory with it is complete
    (out / SYNTH_MARKER).write_text(json.dumps(
        {"preset": preset, "mirrors": p.real_name, "vit": asdict(p.vit), "lm": asdict(p.lm),
         "weights": desc}, indent=2))
    return out


def is_synthesized(model: str | os.PathLike) -> bool:
    return (Path(model) / SYNTH_MARKER).is_file()


def weights_id(model: str | os.PathLike) -> str | None:
    """What a synthesized checkpoint's weights are ("normal0.02-v1-seed0-bfloat16"), or None
    for one without weights and for any other model (real weights need no id: the path
    names them)."""
    try:
        w = json.loads((Path(model) / SYNTH_MARKER).read_text()).get("weights")
    except (OSError, ValueError):
        return None
    return f"{w['scheme']}-seed{w['seed']}-{w['dtype']}" if isinstance(w, dict) else None


def has_weights(model: str | os.PathLike) -> bool:
    return weights_id(model) is not None


def parse_preset(name: str) -> tuple[str, bool]:
    """``NAME``, ``NAME+weights`` or ``NAME+dummy`` -> (preset, with weights?).

    A bare name gets the preset's default: weights for tiny (CPU tests compare captions, which
    need outputs that depend on the image), none for the large presets (their weights take
    minutes and GBs to write, and throughput does not depend on them).
    """
    base, _, suffix = name.partition("+")
    if base not in PRESETS:
        raise ValueError(f"unknown preset {base!r}: choose from {', '.join(PRESETS)}")
    if suffix not in ("", "weights", "dummy"):
        raise ValueError(f"preset {name!r}: the suffix must be +weights or +dummy")
    return base, PRESETS[base].weights if not suffix else suffix == "weights"


def ensure(preset: str, root: str | os.PathLike, *, weights: bool | None = None) -> Path:
    """Synthesize `preset` under `root` once; later calls reuse it.

    `weights` None: the preset's default (`parse_preset`). The directory is ``root/NAME`` or
    ``root/NAME-weights`` (not "+": transformers imports the remote code under the directory's
    name and warns about a "+"), so the two kinds never share a path (or a compile-cache entry).
    A stable path matters: vLLM's compile-cache hash includes the model path string, so jobs
    that share a cache must also share the checkpoint path.
    """
    if weights is None:
        weights = PRESETS[preset].weights if preset in PRESETS else False
    import fcntl

    out = Path(root) / (preset + ("-weights" if weights else ""))
    if (out / SYNTH_MARKER).is_file():
        return out
    # replicas and array tasks may all ask at once: one writes (1B weights: ~2 GB, half a
    # minute), the others wait for it instead of each drawing their own copy
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(Path(root) / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / SYNTH_MARKER).is_file():
            return out
        import shutil

        tmp = Path(root) / f".{out.name}.tmp{os.getpid()}"
        try:
            synthesize(preset, tmp, weights=weights)
        except BaseException:  # a full disk: not gigabytes of a half checkpoint left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.replace(tmp, out)
        except OSError:  # an older, lockless writer won the race: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def config_copy(preset: str) -> dict:
    return copy.deepcopy(build_config(PRESETS[preset]))
