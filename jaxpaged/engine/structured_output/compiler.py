"""Grammar compilation with xgrammar: off the caller's thread, cached, with a timeout.

A `GrammarCompiler` serves one tokenizer and vocabulary (`get_grammar_compiler`: one per
process and model, so an in-process client and its engine core share the cache). The client
compiles a request's grammar before submitting it (`compile` / `compile_async`: a bad spec or a
compile slower than `COMPILE_TIMEOUT_S` is a ValueError, the server's 400); the engine core
`submit`s the same spec and leaves the request waiting until the future is done, so its loop
never compiles. xgrammar (which imports torch) is imported on first use: it is the
`structured` extra, and a request without it gets an error naming the extra.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import json
import os
import re
import threading
from typing import Any

from jaxpaged.engine.structured_output.lark import is_lark, lark_to_ebnf
from jaxpaged.engine.structured_output.params import StructuredOutputsParams

COMPILE_TIMEOUT_S = 30.0  # a grammar not compiled in this time is refused (the request's 400)
CACHE_BYTES = 512 << 20  # compiled grammars kept (least recently used first out)
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar's "[time] file.cc:line: " on its errors


def import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise ValueError("structured output needs xgrammar: pip install 'jaxpaged[structured]'") from None
    return xgrammar


# a CPU quota: cgroup v2's "quota period" file, or cgroup v1's two files (quota -1: none)
_CGROUP_QUOTAS = (("/sys/fs/cgroup/cpu.max",),
                  ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity, capped by a cgroup CPU quota (v2
    `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`). xgrammar's "auto" thread counts
    read the machine's cores, which a container may have many more of than its quota allows
    (its threads would then wait on each other)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for files in _CGROUP_QUOTAS:
        try:
            quota, period = " ".join(open(f).read() for f in files).split()[:2]
            if quota not in ("max", "-1"):
                return min(cpus, max(1, -(-int(quota) // int(period))))
        except (OSError, ValueError):
            pass
    return cpus


def build_grammar(params: StructuredOutputsParams) -> Any:
    """The spec as an `xgrammar.Grammar` (no tokenizer needed); ValueError naming what is wrong."""
    xgr = import_xgrammar()
    kind, spec, any_whitespace = params.key
    try:
        if kind == "json":
            schema = json.dumps(_lengths_as_patterns(params.json))
            return xgr.Grammar.from_json_schema(schema, any_whitespace=any_whitespace)
        if kind == "json_object":  # any object: no strict mode, which would forbid every property
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=any_whitespace, strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec)
        if kind == "choice":
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(_ebnf_literal(c) for c in params.choice))
        if kind == "structural_tag":
            return _structural_tag(xgr, params.structural_tag)
        return xgr.Grammar.from_ebnf(_ebnf(spec))
    except RuntimeError as e:
        what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar (EBNF)", "choice": "choice",
                "structural_tag": "structural tag"}[kind]
        raise ValueError(f"invalid {what} for structured outputs: {_XGRAMMAR_PREFIX.sub('', str(e)).strip()}") from None


def _ebnf(grammar: str) -> str:
    """A `grammar` spec as EBNF: Lark's converted (vLLM's xgrammar backend does the same)."""
    if not is_lark(grammar):
        return grammar
    try:
        return lark_to_ebnf(grammar)
    except ValueError as e:
        raise ValueError(f"invalid grammar (Lark) for structured outputs: {e}") from None


def _structural_tag(xgr: Any, tag: dict[str, Any]) -> Any:
    """vLLM's two forms: `{"structures": [{"begin", "schema", "end"}], "triggers"}` (free text
    until a trigger, then a tag whose content follows its schema), else xgrammar's
    `{"type": "structural_tag", "format"}`. ValueError naming a malformed field."""
    if "structures" not in tag:
        return xgr.Grammar.from_structural_tag(json.dumps(tag))
    structures, triggers = tag["structures"], tag.get("triggers")
    if not isinstance(structures, list) or not isinstance(triggers, list) or not all(isinstance(t, str) for t in triggers):
        raise ValueError("a structural tag needs `structures` (a list) and `triggers` (a list of strings)")
    items = []
    for s in structures:
        if not isinstance(s, dict) or not isinstance(s.get("begin"), str) or not isinstance(s.get("end"), str) \
                or not isinstance(s.get("schema"), dict):
            raise ValueError("each structural tag structure needs `begin` and `end` strings and a `schema` object")
        items.append(xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(_lengths_as_patterns(s["schema"])),
                                           end=s["end"]))
    return xgr.Grammar.from_structural_tag(items, triggers)


def _lengths_as_patterns(schema: Any) -> Any:
    """The schema with each plain string's minLength / maxLength written as a pattern of the
    same length bounds. xgrammar's own length rule admits raw control characters, which is
    invalid JSON (its issue 800); its pattern rule keeps to JSON string characters."""
    if isinstance(schema, list):
        return [_lengths_as_patterns(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _lengths_as_patterns(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and not {"pattern", "format", "enum", "const"} & out.keys():
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^[\\s\\S]{{{low},{high}}}$"
    return out


def _ebnf_literal(text: str) -> str:
    """An EBNF string literal matching `text` exactly (JSON's escapes, which xgrammar reads)."""
    if not text:
        raise ValueError("structured outputs' choice strings must not be empty")
    return json.dumps(text, ensure_ascii=False)


class GrammarCompiler:
    """Compiles `StructuredOutputsParams` for one tokenizer (`tokenizer_path`) and logits width
    (`vocab_size`: ids the tokenizer lacks are never allowed), ending at `stop_token_ids`."""

    def __init__(self, tokenizer_path: str, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self.tokenizer_path, self.vocab_size, self.stop_token_ids = tokenizer_path, vocab_size, stop_token_ids
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="jaxpaged-grammar")
        self._lock = threading.Lock()  # the cache
        self._init_lock = threading.Lock()  # xgrammar's compiler, built once
        self._cache: collections.OrderedDict[tuple, concurrent.futures.Future] = collections.OrderedDict()
        self._xgr_compiler: Any = None

    def submit(self, params: StructuredOutputsParams) -> concurrent.futures.Future:
        """The compiled grammar of `params` (an `xgrammar.CompiledGrammar`), as a future: from
        the cache, else compiled on the pool."""
        key = params.key
        with self._lock:
            future = self._cache.get(key)
            new = future is None
            if new:
                future = self._cache[key] = self._pool.submit(self._compile, params)
            self._cache.move_to_end(key)
        if new:  # outside the lock: a future already done runs its callback here
            future.add_done_callback(lambda _: self._evict())
        return future

    def compile(self, params: StructuredOutputsParams, timeout: float | None = None) -> Any:
        """The compiled grammar, waiting at most `timeout` s (`COMPILE_TIMEOUT_S`); ValueError if
        it cannot be had."""
        timeout = COMPILE_TIMEOUT_S if timeout is None else timeout
        try:
            return self.submit(params).result(timeout)
        except concurrent.futures.TimeoutError:
            raise ValueError(_timeout_message(params, timeout)) from None

    async def compile_async(self, params: StructuredOutputsParams, timeout: float | None = None) -> Any:
        """`compile` for an event loop (which keeps serving while the pool compiles)."""
        timeout = COMPILE_TIMEOUT_S if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.submit(params))), timeout)
        except asyncio.TimeoutError:
            raise ValueError(_timeout_message(params, timeout)) from None

    def _compile(self, params: StructuredOutputsParams) -> Any:
        grammar = build_grammar(params)
        return self._compiler().compile_grammar(grammar)

    def _compiler(self) -> Any:
        """xgrammar's compiler over the tokenizer, built on first use (on the pool)."""
        with self._init_lock:
            if self._xgr_compiler is None:
                import transformers

                xgr = import_xgrammar()
                tokenizer = transformers.AutoTokenizer.from_pretrained(self.tokenizer_path)
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=list(self.stop_token_ids) or None)
                self._xgr_compiler = xgr.GrammarCompiler(info, max_threads=min(8, usable_cpus()),
                                                         cache_enabled=False)  # the cache is ours
            return self._xgr_compiler

    def _evict(self) -> None:
        """Drop the least recently used compiled grammars beyond `CACHE_BYTES`; failed compiles
        count nothing and stay, so a bad spec is refused again at once."""
        with self._lock:
            done = [(k, f) for k, f in self._cache.items() if f.done()]
            sizes = {k: f.result().memory_size_bytes if f.exception() is None else 0 for k, f in done}
            total = sum(sizes.values())
            for k, _ in done:
                if total <= CACHE_BYTES:
                    break
                total -= sizes[k]
                del self._cache[k]


def _timeout_message(params: StructuredOutputsParams, timeout: float) -> str:
    return f"structured outputs: the {params.describe()} did not compile within {timeout:g} s"


@functools.cache
def get_grammar_compiler(tokenizer_path: str, vocab_size: int, stop_token_ids: tuple[int, ...]) -> GrammarCompiler:
    """The process's compiler for a tokenizer and vocabulary (shared by a client and the core)."""
    return GrammarCompiler(tokenizer_path, vocab_size, stop_token_ids)
