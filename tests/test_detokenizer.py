"""Incremental detokenization and stop strings against `tokenizer.decode` of all ids."""
from __future__ import annotations

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from jaxpaged.engine.detokenizer import IncrementalDetokenizer, StopChecker
from jaxpaged.models.tiny import make_tokenizer

TEXTS = [
    "Hello world! How are you today?",
    "emoji 🙂🚀 and more 🎉👍🏽 faces",
    "日本語のテキスト, 中文字符, 한국어",
    "Ünïcödé téxt: café, naïve, über, Ωmega ß ø",
    "mixed: 🙂日é🚀 z\n\ttabs and  spaces",
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def stream(tok, ids, chunk=1, prompt=(), **kw):
    """Deltas of `ids` added `chunk` at a time, then the final flush."""
    detok = IncrementalDetokenizer(tok, list(prompt), **kw)
    deltas = [detok.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)] + [detok.flush()]
    assert "".join(deltas) == detok.text
    return deltas


def byte_ids(tok, text):
    """One single-byte token per UTF-8 byte of `text`."""
    b2u = bytes_to_unicode()
    return [tok.convert_tokens_to_ids(b2u[b]) for b in text.encode()]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_encoded_text_roundtrips(tok, text, chunk):
    ids = tok.encode(text)
    deltas = stream(tok, ids, chunk)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("text", ["🙂", "日本", "é", "a🚀b", "𝄞"])
def test_single_byte_tokens_of_split_characters(tok, text):
    ids = byte_ids(tok, text)
    assert len(ids) == len(text.encode())
    deltas = stream(tok, ids)
    assert "".join(deltas) == text
    assert [d for d in deltas if d] == list(text)  # each character once, when complete
    assert not any("\ufffd" in d for d in deltas)


def test_window_stays_short(tok):
    detok = IncrementalDetokenizer(tok, tok.encode(TEXTS[0]))
    for t in tok.encode(" ".join(TEXTS * 20)):
        detok.add([t])
        assert len(detok._ids) <= 8  # per-token decode cost does not grow with the output


def test_flush_incomplete_last_character(tok):
    ids = tok.encode("ok ") + byte_ids(tok, "🙂")[:3]
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(ids) == "ok "
    assert detok.flush() == "\ufffd" and detok.text == tok.decode(ids) == "ok \ufffd"
    assert detok.flush() == ""


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_random_ids_match_full_decode(tok, skip, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(tok), 200).tolist()
    prompt = rng.integers(0, len(tok), 7).tolist() if seed % 2 else []
    if seed >= 3:  # splice in complete characters as single-byte tokens
        ids[50:50] = byte_ids(tok, "🙂日é")
    deltas = stream(tok, ids, chunk=1 + seed % 3, prompt=prompt, skip_special_tokens=skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


def test_no_replacement_char_when_full_text_has_none(tok):
    rng = np.random.default_rng(0)
    pieces = [tok.encode(t) for t in TEXTS] + [byte_ids(tok, t) for t in TEXTS]
    ids = [i for k in rng.permutation(len(pieces)) for i in pieces[k]]
    deltas = stream(tok, ids, prompt=byte_ids(tok, "🙂"))
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_special_tokens(tok):
    end, start = tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    ids = tok.encode("hi é") + [end, start] + byte_ids(tok, "🙂") + [end]
    assert "".join(stream(tok, ids)) == "hi é🙂"
    kept = "".join(stream(tok, ids, skip_special_tokens=False))
    assert kept == tok.decode(ids, skip_special_tokens=False) == "hi é<|im_end|><|im_start|>🙂<|im_end|>"
    # A special token between the bytes of one character does not break it when skipped.
    split = byte_ids(tok, "日")
    assert "".join(stream(tok, split[:1] + [end] + split[1:])) == "日"


def test_spaces_between_special_tokens():
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<a>": 3, "<b>": 4}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer, t.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece()
    wtok = transformers.PreTrainedTokenizerFast(tokenizer_object=t, additional_special_tokens=["<a>", "<b>"])
    ids = [1, 3, 4, 2]
    assert "".join(stream(wtok, ids, skip_special_tokens=False)) == "hello <a> <b> world"
    assert "".join(stream(wtok, ids, skip_special_tokens=False,
                          spaces_between_special_tokens=False)) == "hello <a><b> world"
    assert "".join(stream(wtok, ids)) == "hello world"
    assert "".join(stream(wtok, ids[1:], prompt=[1], skip_special_tokens=False)) == " <a> <b> world"  # prompt gives context


def run_with_stops(tok, ids, stop, include=False):
    """Drives detokenizer + checker like an engine; returns (streamed deltas, stop, text, step)."""
    detok, checker = IncrementalDetokenizer(tok, []), StopChecker(stop, include)
    sent = []
    for step, t in enumerate(ids):
        delta = detok.add([t])
        upd = checker.update(detok.text, len(delta), sum(map(len, sent)), finished=step == len(ids) - 1)
        sent.append(upd.delta)
        assert upd.text.startswith("".join(sent))  # nothing streamed past the final text
        if upd.stop is not None:
            return sent, upd.stop, upd.text, step
    return sent, None, detok.text, len(ids) - 1


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("text,stop", [
    ("The quick brown fox jumps over the lazy dog.", "brown fox"),
    ("Readability counts. Special cases", "ty counts. Sp"),
    ("emoji 🙂🚀 and accents: café", "🚀 and"),
    ("日本語のテキスト, done", "語のテ"),
])
def test_stop_string_across_tokens(tok, text, stop, include):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [])
    ends = np.cumsum([len(detok.add([t])) for t in ids])  # text length after each token
    start = text.index(stop)
    spanned = int(np.searchsorted(ends, start + len(stop))) - int(np.searchsorted(ends, start, side="right"))
    assert spanned >= 1  # the stop string spans at least two tokens
    sent, matched, final, step = run_with_stops(tok, ids, ["nope", stop], include)
    assert matched == stop
    assert final == text[:start + len(stop)] if include else final == text[:start]
    assert "".join(sent) == final
    assert step == int(np.searchsorted(ends, start + len(stop)))  # found on the completing token


def test_stop_spanning_three_tokens(tok):
    ids = byte_ids(tok, "ab🙂cd")  # one token per byte: the stop spans 3+ tokens
    sent, matched, final, _ = run_with_stops(tok, ids, ["b🙂c"])
    assert (matched, final, "".join(sent)) == ("b🙂c", "a", "a")
    assert run_with_stops(tok, ids, ["b🙂c"], include=True)[1:3] == ("b🙂c", "ab🙂c")


@pytest.mark.parametrize("seed", range(20))
def test_random_stops_match_char_by_char_oracle(tok, seed):
    rng = np.random.default_rng(seed)
    text = " ".join(rng.choice(TEXTS, 3))
    ids = tok.encode(text)
    stops = []
    for _ in range(rng.integers(1, 4)):
        i = int(rng.integers(0, len(text)))
        stops.append(text[i:i + int(rng.integers(1, 8))] if rng.random() < 0.8 else "zzz")
    include = bool(rng.random() < 0.5)
    # Oracle: the first stop string to complete (ties: longest), on the full decode.
    found = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    sent, matched, final, _ = run_with_stops(tok, ids, stops, include)
    if found:
        end, _, s = min(found)
        assert (matched, final) == (s, text[:end if include else end - len(s)])
    else:
        assert (matched, final) == (None, text)
    assert "".join(sent) == final


def test_held_back_and_flush():
    checker = StopChecker(["world", "wow"])
    assert checker.held_back("hello wor") == 3
    assert checker.held_back("hello wo") == 2
    assert checker.held_back("hello") == 0
    assert checker.update("hello wor", 3, 0) == ("hello ", None, "hello wor")
    assert checker.update("hello wor", 0, 6, finished=True) == ("wor", None, "hello wor")
    assert checker.update("hello world!", 3, 6) == ("", "world", "hello ")
    assert StopChecker(["world"], True).update("hello wor", 3, 0).delta == "hello wor"
    assert StopChecker("x").stop == ["x"] and StopChecker(None).update("ab", 2, 0).delta == "ab"
    assert StopChecker(["abc", "b"]).find("xabc", 3) == ("b", "xa")  # the first to complete
