"""Tiny random-weight HF checkpoints, made offline: tests and the server's demo model.

Writes a real HF model directory: `config.json` from the transformers config class,
`*.safetensors` with HF tensor names (optionally sharded, with the index), and a small
byte-level BPE tokenizer trained with `tokenizers`, with a ChatML chat template. Needs
no PyTorch, so a fresh install can build the demo model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import transformers
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxpaged.models.config import config_from_hf
from jaxpaged.models.family import build_params, family_module

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
# Short name -> (HF model_type, config overrides). Each variant exercises one family feature.
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(_BASE, tie_word_embeddings=False)),
    # 16 query / 8 KV heads: tensor parallelism up to 8 ways
    "llama-tp": ("llama", dict(_BASE, num_attention_heads=16, num_key_value_heads=8, head_dim=16)),
    "llama3": ("llama", dict(_BASE, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=64))),
    "mistral": ("mistral", dict(_BASE, sliding_window=8, tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(_BASE, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(_BASE, head_dim=32, tie_word_embeddings=False)),
    "granite": ("granite", dict(_BASE, embedding_multiplier=4.0, residual_multiplier=0.5,
                                attention_multiplier=0.2, logits_scaling=2.0, tie_word_embeddings=True)),
    "opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, word_embed_proj_dim=32, do_layer_norm_before=True)),
    "opt-postln": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=256, do_layer_norm_before=False)),
}
_CORPUS = """\
jaxpaged serves large language models with JAX and Pallas. The key value cache lives in
fixed-size blocks of one pool, and block tables map each sequence to its blocks, so memory is
shared and almost never wasted. A scheduler admits and retires requests every iteration, chunks
long prompts and preempts under memory pressure. The model forward is a pure function over
parameters, the paged cache and the block tables. Hello world! How are you today? I am fine,
thank you. The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < >
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Complex is better than complicated. Flat is better than nested. Sparse is better than dense.
Readability counts. Special cases aren't special enough to break the rules. Although
practicality beats purity. Errors should never pass silently. Unless explicitly silenced.
In the face of ambiguity, refuse the temptation to guess. Now is better than never.
Ünïcödé téxt, 日本語のテキスト, emoji 🙂🚀 and accents: café, naïve, über.
"""


def make_tokenizer(vocab_size: int = 512, extra_special_tokens: tuple[str, ...] = ()) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE trained on a built-in corpus (deterministic, offline); `extra_special_tokens`
    (e.g. `<think>`) get the ids after SPECIAL_TOKENS', within the same `vocab_size`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + list(extra_special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
    )


def _random_param(key: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    leaf = key.rsplit("/", 1)[-1]
    if "norm" in leaf and not leaf.endswith("_b"):  # norm scales near 1, but not 1
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (0.05 * rng.standard_normal(shape)).astype(np.float32)


def make_tiny_model(out_dir: str | Path, variant: str = "llama", *, seed: int = 0,
                    num_shards: int = 1, config: dict | None = None) -> Path:
    """Write a random-weight HF checkpoint of `variant` (see VARIANTS) with its tokenizer;
    `config` overrides the variant's HF config fields (e.g. `head_dim`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny-model variant {variant!r}; choose from {', '.join(VARIANTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    model_type, overrides = VARIANTS[variant]
    overrides = {**overrides, **(config or {})}
    eos, bos = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    hf_cfg = transformers.CONFIG_MAPPING[model_type](
        vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=eos, pad_token_id=bos, **overrides)
    hf_cfg.architectures = [type(hf_cfg).__name__.replace("Config", "ForCausalLM")]
    hf_cfg.dtype = "float32"
    hf_cfg.save_pretrained(out)
    tokenizer.save_pretrained(out)

    cfg = config_from_hf(hf_cfg.to_dict())
    mod = family_module(cfg)
    rng = np.random.default_rng(seed)
    tensors = {}

    def make(key: str, shape: tuple[int, ...], layer: int | None) -> None:
        value = _random_param(key, shape, rng)
        tensors.update(mod.to_hf(cfg, key, layer, value))

    build_params(cfg, make)
    _save_safetensors(out, tensors, num_shards)
    return out


def _save_safetensors(out: Path, tensors: dict[str, np.ndarray], num_shards: int) -> None:
    meta = {"format": "pt"}
    if num_shards == 1:
        save_file(tensors, out / "model.safetensors", metadata=meta)
        return
    names = list(tensors)
    weight_map = {}
    for s, chunk in enumerate(np.array_split(np.arange(len(names)), num_shards)):
        fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({names[i]: tensors[names[i]] for i in chunk}, out / fname, metadata=meta)
        weight_map |= {names[i]: fname for i in chunk}
    total = sum(t.nbytes for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
