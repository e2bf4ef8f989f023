"""vLLM's engine arguments by name, for `LLM(...)` and `jaxpaged serve` alike: `EngineConfig`'s
fields, plus the vLLM arguments that change nothing here (accepted with a one-line warning)
and those whose effect would silently differ (only the value that matches jaxpaged passes).
One table, so that the offline API and the CLI cannot drift apart."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxpaged.engine.config import EngineConfig
from jaxpaged.engine.hub import resolve_model

logger = logging.getLogger("jaxpaged")


@dataclasses.dataclass(frozen=True)
class NoEffect:
    """Accepted with a warning when set: `why` it changes nothing here."""
    why: str


@dataclasses.dataclass(frozen=True)
class OnlyValues:
    """Accepted at one of `allowed` (vLLM's default first); any other value is an error: `why`."""
    allowed: tuple
    why: str


EXTRA_ARGS: dict[str, NoEffect | OnlyValues] = {
    "trust_remote_code": NoEffect("jaxpaged runs no code from the model repository"),
    "enforce_eager": NoEffect("the steps are always compiled ahead; there are no CUDA graphs to skip"),
    "swap_space": NoEffect("a preempted request is recomputed; nothing is swapped to host memory"),
    "max_seq_len_to_capture": NoEffect("there are no CUDA graphs; the compiled step sizes are token_buckets"),
    "disable_custom_all_reduce": NoEffect("collectives are XLA's; there is no custom all-reduce"),
    "distributed_executor_backend": NoEffect("one JAX process per host drives all its devices; no workers to launch"),
    "disable_log_stats": NoEffect("no periodic stats are logged here; /metrics is always served"),
    "tokenizer_mode": OnlyValues(("auto", "hf"), "jaxpaged uses the HF (fast) tokenizer"),
    "enable_chunked_prefill": OnlyValues((None, True), "prompts are always prefilled in chunks here"),
    "pipeline_parallel_size": OnlyValues((1,), "no pipeline parallelism here; use tensor_parallel_size"),
    "data_parallel_size": OnlyValues((1,), "no data parallelism here; run one server per replica"),
    "scheduling_policy": OnlyValues(("fcfs",), "requests are scheduled first come, first served"),
    "guided_decoding_backend": OnlyValues((None, "auto", "xgrammar"), "the structured-output backend is xgrammar"),
    "structured_outputs_config": OnlyValues((None, {}, {"backend": "auto"}, {"backend": "xgrammar"}),
                                            "the structured-output backend is xgrammar, with no options"),
}
# Arguments that locate the model and tokenizer (hub ids) rather than configure the engine.
LOCATE_ARGS = ("revision", "tokenizer_revision", "download_dir")
ENGINE_ARGS = frozenset({f.name for f in dataclasses.fields(EngineConfig)} | set(EXTRA_ARGS) | set(LOCATE_ARGS))


def check_extra_args(values: dict[str, Any], flag: Callable[[str], str] = str) -> None:
    """Warn for each no-effect argument that is set; ValueError naming the first unsupported one.
    `flag` spells a name for the message (`--tokenizer-mode` on the CLI)."""
    for name, rule in EXTRA_ARGS.items():
        value = values.get(name)
        if isinstance(rule, NoEffect) and value not in (None, False):
            logger.warning("%s changes nothing here: %s", flag(name), rule.why)
        elif isinstance(rule, OnlyValues) and name in values and value not in rule.allowed:
            raise ValueError(f"{flag(name)}={value!r} is not supported: {rule.why}")


def create_engine_config(model: str, kwargs: dict[str, Any], flag: Callable[[str], str] = str,
                         resolve: bool = True) -> EngineConfig:
    """`EngineConfig` from vLLM's argument names: an unknown name is a TypeError naming it, an
    unsupported value a ValueError naming it; the model, tokenizer and draft model may be hub ids (`resolve`:
    find or download them; off for the demo model, which the engine core builds)."""
    unknown = sorted(set(kwargs) - ENGINE_ARGS)
    if unknown:
        raise TypeError(f"unexpected engine argument(s): {', '.join(unknown)}")
    check_extra_args(kwargs, flag)
    # None is vLLM's "unset": EngineConfig's default applies
    fields = {k: v for k, v in kwargs.items() if k not in EXTRA_ARGS and k not in LOCATE_ARGS and v is not None}
    if resolve:
        download_dir = kwargs.get("download_dir")
        model = resolve_model(model, kwargs.get("revision"), download_dir)

        def resolve_other(name: str, revision: str | None) -> str:
            """A second model folder (tokenizer, draft model): a local one takes no download_dir."""
            return resolve_model(name, revision, None if Path(name).expanduser().is_dir() else download_dir)

        if (tok := fields.get("tokenizer")) is not None:
            fields["tokenizer"] = resolve_other(tok, kwargs.get("tokenizer_revision"))
        spec = fields.get("speculative_config")
        if isinstance(spec, dict) and isinstance(spec.get("model"), str):  # the draft model: a folder or hub id
            fields["speculative_config"] = spec | {"model": resolve_other(spec["model"], None)}
    return EngineConfig(model=model, **fields)
