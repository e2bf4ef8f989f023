"""Structured output after reasoning (engine/structured_output/reasoning.py): with a reasoning
parser the grammar neither masks nor advances until the sample emits `</think>`, and a prompt
that closed its think block is constrained from the first token (vLLM's `reasoning_ended`).
The tiny model's checkpoint with a tokenizer whose `<think>` / `</think>` are tokens; the
engine shapes of tests/test_server.py (no compile)."""
from __future__ import annotations

import re
import shutil

import pytest
from test_server import ENGINE

from jaxpaged import LLM, SamplingParams, StructuredOutputsParams
from jaxpaged.engine.config import EngineConfig
from jaxpaged.engine.structured_output.reasoning import REASONING_TAGS, THINK_TAGS, ReasoningTokens
from jaxpaged.engine.structured_output.request import StructuredOutputRequest
from jaxpaged.models.tiny import SPECIAL_TOKENS, make_tokenizer
from jaxpaged.serve.reasoning import REASONING_PARSERS, get_reasoning_parser

REGEX = r"[a-z]{3}-\d{2}"


@pytest.fixture(scope="module")
def think_dir(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint with a tokenizer of the same size that has `<think>` and `</think>`."""
    out = tmp_path_factory.mktemp("think")
    for f in tiny_model_dir("llama").iterdir():
        if f.suffix in (".json", ".safetensors") and not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    tok = make_tokenizer(extra_special_tokens=THINK_TAGS)
    assert len(tok) == 512 and tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2]  # the model's eos stays
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llm(think_dir):
    return LLM(str(think_dir), **ENGINE, reasoning_parser="qwen3")


def _generate(llm, prompt: str) -> tuple[list[int], str]:
    """Greedy under REGEX, with `</think>` pushed far above every other token."""
    end = llm.get_tokenizer().convert_tokens_to_ids("</think>")
    p = SamplingParams(temperature=0, max_tokens=20, logit_bias={end: 100.0},
                       structured_outputs=StructuredOutputsParams(regex=REGEX))
    out = llm.generate(prompt, p, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop", out
    return out.token_ids, out.text


def test_the_grammar_holds_once_the_reasoning_ends(llm):
    """The prompt leaves reasoning open: `</think>` (which the regex forbids) is sampled first,
    neither masked nor fed to the grammar; the answer after it follows the regex."""
    tok = llm.get_tokenizer()
    ids, _ = _generate(llm, "Answer:")
    assert ids[0] == tok.convert_tokens_to_ids("</think>")
    assert re.fullmatch(REGEX, tok.decode(ids[1:], skip_special_tokens=True)), tok.decode(ids)


def test_a_prompt_that_closed_its_think_block_is_constrained_from_the_first_token(llm):
    """Qwen3's template with `enable_thinking: false` closes an empty block in the prompt."""
    ids, text = _generate(llm, "Answer:<think>\n\n</think>\n\n")
    assert re.fullmatch(REGEX, text), text


def test_reasoning_end_is_the_last_tag_and_the_tags_are_the_servers():
    r = ReasoningTokens(start_ids=(7,), end_ids=(8, 9))
    cases = ([], [7, 5], [7, 5, 8, 9, 3], [7, 8, 9, 7], [8, 9], [7, 8, 3, 9])
    assert [r.ended(ids) for ids in cases] == [False, False, True, False, True, False]
    assert set(REASONING_TAGS) == set(REASONING_PARSERS)
    for name, tags in REASONING_TAGS.items():
        parser = get_reasoning_parser(name)
        assert (parser.start_token, parser.end_token) == tags


def test_tags_are_their_token_ids_or_their_encoding_and_a_bad_parser_is_an_error():
    """A tokenizer without `<think>` tokens (the demo's, the tiny model's): the tags' encodings."""
    tok = make_tokenizer()
    r = ReasoningTokens.of("qwen3", tok)
    assert len(r.end_ids) > 1 and tok.decode(list(r.end_ids)) == "</think>"
    assert ReasoningTokens.of("qwen3", make_tokenizer(extra_special_tokens=THINK_TAGS)) == ReasoningTokens((3,), (4,))
    grammar = StructuredOutputRequest(None, reasoning_end=(8, 9), reasoning_ended=False)
    ended = []
    for token in (8, 3, 9, 8, 9):  # reasoning tokens are accepted without a grammar
        assert grammar.accept(token)
        ended.append(grammar.reasoning_ended)
    assert ended == [False, False, False, False, True]
    with pytest.raises(ValueError, match="reasoning_parser must be one of deepseek_r1, qwen3, got 'r2'"):
        EngineConfig(model="m", reasoning_parser="r2")
