"""Engine settings (vLLM's names), shared by `LLM`, the server CLI and the benchmarks."""
from __future__ import annotations

import dataclasses

from jaxpaged.engine.sampling_params import MAX_LOGPROBS
from jaxpaged.engine.spec_decode.config import SpeculativeConfig
from jaxpaged.engine.structured_output.reasoning import REASONING_TAGS

DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's spellings
# vLLM's `quantization` values served here (models/quantization/config.py's QUANTIZATION_CHOICES, kept
# apart so that the API server, which builds an EngineConfig, does not import JAX): fp8 / int8 / int4
# quantize a float checkpoint at load; the others name a quantized checkpoint's format.
QUANTIZATION_METHODS = ("fp8", "int8", "int4", "compressed-tensors", "modelopt", "fbgemm_fp8", "awq", "gptq",
                        "awq_marlin", "gptq_marlin")
# vLLM's `kv_cache_dtype` values served here (models/kv_cache.py's, kept apart as above): auto is the
# model's dtype; bfloat16 whatever the model's; fp8 (= fp8_e4m3) and fp8_e5m2 store K and V in one
# byte, with per-layer scales
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclasses.dataclass
class EngineConfig:
    model: str
    tokenizer: str | None = None  # defaults to `model`
    dtype: str = "auto"
    load_format: str = "auto"  # "auto" (safetensors) or "dummy" (random weights, for benchmarks)
    # None: the checkpoint's own (config.json quantization_config) or none; QUANTIZATION_METHODS
    quantization: str | None = None
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES; an fp8 pool reads the checkpoint's k/v scales (else 1.0)
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped on a CPU)
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # explicit pool size (any backend), scratch block included
    block_size: int = 16
    max_num_seqs: int | None = None  # None: the platform's default (engine/platform_defaults.py)
    max_num_batched_tokens: int | None = None  # token budget per step; None: the platform's default
    # most tokens of one prompt per step (0: up to the budget); vLLM's name. Bounds the steps that
    # carry decodes (inter-token latency) while several prompts can still fill the budget.
    long_prefill_token_threshold: int = 0
    # token budget of a step that carries decodes while the prompt tokens still to compute fit
    # in one full budget (0: off; not a vLLM argument; a token bucket of its own). Keeps
    # inter-token latency near a decode step's at moderate load (on the H200, 8B shape: p99 ITL
    # 1.9x the median at 16 req/s, against 6.4x without); a backlog gets the whole budget.
    decoding_token_budget: int = 384
    token_buckets: tuple[int, ...] | None = None  # padded step sizes (default: buckets.token_buckets)
    enable_prefix_caching: bool = True
    async_scheduling: bool = True  # launch the next steps before processing a step's outputs
    # async scheduling: launched steps whose outputs may wait unprocessed (1: vLLM's one step
    # ahead; 2 keeps the device busy when the host's work per step outlasts a short step)
    max_steps_in_flight: int = 2
    # multi-step decode (vLLM's num_scheduler_steps): a step whose rows are all decodes runs up
    # to this many forward + sample iterations in one program (one schedule and one dispatch)
    num_scheduler_steps: int = 1
    seed: int = 0
    # "auto", "reference" (jnp), "cpu" (jnp, chunked), "pallas" (GPU kernel), "mosaic" (Hopper prefill kernel)
    attention_backend: str = "auto"
    tensor_parallel_size: int = 1
    compile_threads: int | None = None  # warm-up compiles in parallel; default one per CPU core
    # Multi-process runtime (jax.distributed), e.g. one process per host: all three or none.
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int = 1
    process_id: int = 0
    cpu_kv_cache_bytes: int = 1 << 30  # pool cap without a device memory budget (a CPU) or num_kv_blocks
    # Request defaults from the model's generation_config.json (engine/generation_config.py):
    # "auto" (the model's folder), "vllm" (ignore it) or a folder; override: HF keys that win.
    generation_config: str = "auto"
    override_generation_config: dict | None = None
    max_logprobs: int = MAX_LOGPROBS  # top logprobs a request may ask for (a larger ask is refused)
    # speculative decoding: vLLM's JSON keys (a dict), parsed into a SpeculativeConfig (spec_decode/)
    speculative_config: SpeculativeConfig | dict | None = None
    # a reasoning model's parser (vLLM's --reasoning-parser): structured output holds after its
    # reasoning block (engine/structured_output/reasoning.py); the server also splits the reply
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("block_size", "max_num_seqs", "tensor_parallel_size", "max_steps_in_flight",
                     "num_scheduler_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("long_prefill_token_threshold", "decoding_token_budget"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (off) or positive, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be at least 2 (one is scratch), got {self.num_kv_blocks}")
        if self.token_buckets is not None and (not self.token_buckets or min(self.token_buckets) < 1):
            raise ValueError(f"token_buckets must be positive token counts, got {self.token_buckets}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"max_logprobs must be in [0, {MAX_LOGPROBS}] here (the compiled sampling step "
                             f"returns the top {MAX_LOGPROBS}), got {self.max_logprobs}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported (supported: "
                             f"{', '.join(KV_CACHE_DTYPES)})")
        if isinstance(self.speculative_config, dict):
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        if self.speculative_config is not None and self.speculative_config.method == "draft_model" \
                and self.num_processes > 1:
            raise ValueError("speculative_config method draft_model runs in one process: not with "
                             "num_processes > 1 yet")
        if self.speculative_config is not None and self.num_scheduler_steps > 1:
            raise ValueError("speculative_config and num_scheduler_steps > 1 do not combine (a step either "
                             "verifies drafts or runs the multi-step decode loop)")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_TAGS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(sorted(REASONING_TAGS))}, "
                             f"got {self.reasoning_parser!r}")
        if self.attention_backend not in ("auto", "reference", "cpu", "pallas", "mosaic"):
            raise ValueError(f"attention_backend must be auto, reference, cpu, pallas or mosaic, "
                             f"got {self.attention_backend!r}")
        if self.attention_backend == "mosaic" and self.kv_cache_dtype.startswith("fp8"):
            raise ValueError(f"attention_backend 'mosaic' reads bf16/fp16 KV pools only, not kv_cache_dtype "
                             f"{self.kv_cache_dtype!r}")
