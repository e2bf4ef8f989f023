"""jaxpaged: a JAX/Pallas LLM serving engine with a paged KV cache and continuous batching.

`LLM` (offline, in-process) and `AsyncLLM` (an engine-core process behind asyncio) are
imported on first use, so `import jaxpaged` and the API server never import JAX."""
from jaxpaged.engine.config import EngineConfig
from jaxpaged.engine.outputs import CompletionOutput, Logprob, RequestOutput
from jaxpaged.engine.sampling_params import SamplingParams
from jaxpaged.engine.structured_output import StructuredOutputsParams
from jaxpaged.version import __version__ as __version__

__all__ = ["AsyncLLM", "LLM", "CompletionOutput", "EngineConfig", "Logprob", "RequestOutput", "SamplingParams",
           "StructuredOutputsParams"]


def __getattr__(name: str):
    if name == "LLM":
        from jaxpaged.llm import LLM
        return LLM
    if name == "AsyncLLM":
        from jaxpaged.engine.async_llm import AsyncLLM
        return AsyncLLM
    raise AttributeError(f"module 'jaxpaged' has no attribute {name!r}")
