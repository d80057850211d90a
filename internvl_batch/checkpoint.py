"""Synthesized InternVL checkpoints: real architectures, no weights.

No weights can be downloaded on the hosts this runs on, and benchmarks only need the compute
shape, so we write the directory a real OpenGVLab InternVL3 checkpoint has *minus* the
safetensors: ``config.json`` mirroring the published configs, the config module that
``trust_remote_code`` imports through ``auto_map``, and a byte-level BPE tokenizer that knows
the chat and image tokens. vLLM loads it with ``load_format="dummy"`` (random weights, same
FLOPs). A ``synth.json`` marker tells the engine to default to dummy weights.
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


_VIT_300M = VitShape(hidden=1024, layers=24, heads=16, mlp=4096)
PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", "tiny (CPU tests)",
                   VitShape(hidden=64, layers=2, heads=4, mlp=128, image_size=224),
                   LMShape(hidden=128, layers=2, heads=2, kv_heads=1, mlp=256, vocab=4096,
                           tie_embeddings=True),
                   max_dynamic_patch=4),
    "internvl3-1b": Preset("internvl3-1b", "OpenGVLab/InternVL3-1B", _VIT_300M,
                           LMShape(896, 24, 14, 2, 4864, 151674)),
    "internvl3-2b": Preset("internvl3-2b", "OpenGVLab/InternVL3-2B", _VIT_300M,
                           LMShape(1536, 28, 12, 2, 8960, 151674)),
    "internvl3-8b": Preset("internvl3-8b", "OpenGVLab/InternVL3-8B", _VIT_300M,
                           LMShape(3584, 28, 28, 4, 18944, 151674)),
    # InternVL3-38B's encoder, InternViT-6B-448px-V2_5 (config of its V1-5 predecessor, same
    # architecture: huggingface.co/OpenGVLab/InternViT-6B-448px-V1-5/blob/main/config.json),
    # with the smallest LM: Qwen2-0.5B shapes (the projector maps 4 x 3200 to any LM width)
    "internvit-6b": Preset("internvit-6b", "OpenGVLab/InternVL3-38B vision encoder + 0.5B LM",
                           VitShape(hidden=3200, layers=45, heads=25, mlp=12800,
                                    norm_type="rms_norm", qk_normalization=True,
                                    qkv_bias=False, initializer_factor=0.1),
                           LMShape(896, 24, 14, 2, 4864, 151674)),
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


def synthesize(preset: str, out: str | os.PathLike) -> Path:
    """Write a loadable, weightless InternVL checkpoint for `preset` into `out`."""
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
    (out / SYNTH_MARKER).write_text(json.dumps(
        {"preset": preset, "mirrors": p.real_name, "vit": asdict(p.vit), "lm": asdict(p.lm),
         "weights": "none (load with load_format='dummy')"}, indent=2))
    return out


def is_synthesized(model: str | os.PathLike) -> bool:
    return (Path(model) / SYNTH_MARKER).is_file()


def ensure(preset: str, root: str | os.PathLike) -> Path:
    """Synthesize `preset` under `root` once; later calls reuse it.

    A stable path matters: vLLM's compile-cache hash includes the model path string, so jobs
    that share a cache must also share the checkpoint path.
    """
    out = Path(root) / preset
    if (out / SYNTH_MARKER).is_file():
        return out
    tmp = Path(root) / f".{preset}.tmp{os.getpid()}"
    synthesize(preset, tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race: use theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def config_copy(preset: str) -> dict:
    return copy.deepcopy(build_config(PRESETS[preset]))
