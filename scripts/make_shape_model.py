"""A model directory of a known shape for `--load-format dummy`: config.json plus a synthetic tokenizer.

    python scripts/make_shape_model.py OUT_DIR --model-shape llama3-8b
    python scripts/make_shape_model.py OUT_DIR --tiny      # CPU-sized layers, Llama 3's vocab
    python scripts/make_shape_model.py OUT_DIR --model-shape llama3-8b --bpe-tokenizer  # spells text

config.json is scripts/benchmark_throughput.py's `shape_config` (no weights: serve it with
`--load-format dummy`). The tokenizer covers the whole vocab so that a server streams one text
delta per generated token (a model directory without a tokenizer streams no per-token chunks):
a `tokenizers` WordLevel model whose token i is the word `t{i}`, split on whitespace and decoded
joined by spaces, saved as tokenizer.json + tokenizer_config.json for `AutoTokenizer`, offline.
Ids 128000 and 128001 are `<|begin_of_text|>` and `<|end_of_text|>`, the config's bos and eos;
like Llama 3's, they are special tokens, so they decode to "" with `skip_special_tokens` (the
server's default). Every other id decodes to non-empty text. Builds in about a second.

`--bpe-tokenizer` writes instead a byte-level BPE trained offline on this Python's standard
library sources up to the vocab size (bos and eos special, the ids after the merges: 128000 and
128001 when the sources yield that many merges; config.json names them): a tokenizer that
spells any text, JSON included, for structured output (scripts/benchmark_structured.py). A
minute or so to train.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_throughput import SHAPES, shape_config  # noqa: E402 - one source for the shapes

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)  # over llama3-1b: vocab stays 128256


def config_of(name: str) -> dict:
    """config.json of `name` (a key of SHAPES, or `tiny`)."""
    return shape_config("llama3-1b") | TINY if name == "tiny" else shape_config(name)


def write_tokenizer(out: Path, vocab_size: int, bos_id: int, eos_id: int) -> None:
    """tokenizer.json + tokenizer_config.json: id i <-> the word `t{i}`, bos/eos special."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    special = {bos_id: BOS, eos_id: EOS}
    vocab = {special.get(i, f"t{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # no decoder: decode joins tokens with " "
    tok.add_special_tokens([AddedToken(special[i], special=True, normalized=False) for i in sorted(special)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "model_max_length": 131072, "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "add_eos_token": False}, indent=2))


def write_bpe_tokenizer(out: Path, vocab_size: int) -> tuple[int, int]:
    """tokenizer.json + tokenizer_config.json: a byte-level BPE of at most `vocab_size` ids trained
    on the standard library's sources, then bos and eos; returns their ids."""
    import sysconfig

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((p.read_text(errors="replace") for p in sources), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "model_max_length": 131072, "clean_up_tokenization_spaces": False}, indent=2))
    return tok.token_to_id(BOS), tok.token_to_id(EOS)


def make_shape_model(out_dir: str | Path, name: str, bpe_tokenizer: bool = False) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # transformers < 5.18 warns about a Mistral regex when a local config.json names no version
    cfg = config_of(name) | {"transformers_version": "5.0.0"}  # the format is v5's (rope_parameters, dtype)
    if bpe_tokenizer:
        cfg["bos_token_id"], cfg["eos_token_id"] = write_bpe_tokenizer(out, cfg["vocab_size"])
    else:
        write_tokenizer(out, cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"])
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--model-shape", choices=[*SHAPES, "tiny"], help="a shape of scripts/benchmark_throughput.py")
    ap.add_argument("--tiny", action="store_true", help="= --model-shape tiny: hidden 64, 2 layers, vocab 128256")
    ap.add_argument("--bpe-tokenizer", action="store_true",
                    help="a byte-level BPE trained on the standard library (spells JSON) instead of `t{i}` words")
    a = ap.parse_args(argv)
    if a.tiny == bool(a.model_shape):
        ap.error("give one of --model-shape, --tiny")
    print(make_shape_model(a.out_dir, "tiny" if a.tiny else a.model_shape, a.bpe_tokenizer))


if __name__ == "__main__":
    main()
