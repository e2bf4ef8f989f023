"""The README's "Call the forward from JAX research code" block runs as written on a tiny model,
and its prefill and decode logits are HF transformers' (PyTorch, float32) for the same tokens."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import transformers

README = Path(__file__).parent.parent / "README.md"
SECTION = "## Call the forward from JAX research code"
PLACEHOLDER = '"path/to/hf-model"'


def readme_forward_block() -> str:
    text = README.read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    block = re.search(r"```python\n(.*?)```", text[text.index(SECTION):], re.S)
    assert block and PLACEHOLDER in block.group(1), "the section's first python block loads a model directory"
    return block.group(1)


def test_readme_forward_matches_hf(tiny_model_dir):
    path = tiny_model_dir("llama")
    ns: dict = {}
    exec(compile(readme_forward_block().replace(PLACEHOLDER, repr(str(path))), "README.md", "exec"), ns)

    prompt, next_id = ns["prompt"], ns["next_id"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + [next_id]])).logits[0].numpy()
    assert next_id == int(ref[len(prompt) - 1].argmax())  # greedy on the prompt, as HF
    for ours, want in ((ns["prefill_logits"], ref[len(prompt) - 1]), (ns["decode_logits"], ref[len(prompt)])):
        ours = np.asarray(ours)
        assert ours.shape == (1, hf.config.vocab_size)
        assert np.linalg.norm(ours[0] - want) / np.linalg.norm(want) < 1e-4
