"""Speculative decoding (vLLM V1's `spec_decode`): the config, the n-gram proposer and the
rejection sampler that keeps outputs distributed as the target model's."""
