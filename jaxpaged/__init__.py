"""jaxpaged: a JAX/Pallas LLM serving engine with a paged KV cache and continuous batching."""
from jaxpaged.engine.config import EngineConfig
from jaxpaged.engine.outputs import CompletionOutput, Logprob, RequestOutput
from jaxpaged.engine.sampling_params import SamplingParams
from jaxpaged.llm import LLM

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "Logprob", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
