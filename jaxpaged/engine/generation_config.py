"""The model's generation_config.json as request defaults, by vLLM's rules (`--generation-config`).

"auto" reads the model folder's file, a folder path reads that folder's, "vllm" ignores it;
`override_generation_config` keys win over the file. Of its keys, vLLM takes temperature,
top_p, top_k, min_p, repetition_penalty and max_new_tokens (as max_tokens); a request (or an
offline call without SamplingParams) gets them for what it leaves unset. With a folder path,
or max_new_tokens in the override, max_new_tokens also caps every request's max_tokens.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from jaxpaged.engine.sampling_params import SamplingParams

logger = logging.getLogger("jaxpaged")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None  # for a request that sets none
    max_tokens_cap: int | None = None  # for every request

    def sampling_params(self) -> SamplingParams:
        """vLLM's `LLM.get_default_sampling_params()`: SamplingParams' defaults, these over them."""
        given = {k: getattr(self, k) for k in (*SAMPLING_KEYS, "max_tokens") if getattr(self, k) is not None}
        return SamplingParams(**given)


def load_generation_defaults(model: str, generation_config: str = "auto",
                             override: dict | None = None) -> GenerationDefaults:
    """The defaults for `model` (a local folder); ValueError naming the file when it is unusable."""
    source = "the override"
    config: dict = {}
    if generation_config != "vllm":
        folder = Path(model if generation_config == "auto" else generation_config).expanduser()
        if generation_config != "auto" and not folder.is_dir():
            raise ValueError(f"generation_config {generation_config!r} is neither auto, vllm nor a folder")
        path = folder / "generation_config.json"
        if path.is_file():
            source = str(path)
            try:
                config = json.loads(path.read_text())
            except ValueError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
    config = {**config, **(override or {})}
    values = {k: config[k] for k in (*SAMPLING_KEYS, "max_new_tokens") if config.get(k) is not None}
    max_tokens = values.pop("max_new_tokens", None)
    cap = max_tokens if generation_config not in ("auto", "vllm") else (override or {}).get("max_new_tokens")
    defaults = GenerationDefaults(**values, max_tokens=max_tokens, max_tokens_cap=cap)
    try:
        defaults.sampling_params()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None
    if values or max_tokens is not None:
        logger.info("default sampling parameters from %s: %s (--generation-config vllm ignores them)", source,
                    {**values, **({"max_tokens": max_tokens} if max_tokens is not None else {})})
    return defaults
