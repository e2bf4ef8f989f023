"""The scheduler's drafter for a `SpeculativeConfig`'s method: `NgramDrafter` (prompt lookup)
or `DraftModelProposer` (a draft model, loaded here). Both give a decoding row its drafts
(`propose`, while scheduling) and complete them once the step is scheduled (`fill`)."""
from __future__ import annotations

from jax.sharding import Mesh

from jaxpaged.engine.config import EngineConfig
from jaxpaged.engine.spec_decode.draft_model_proposer import DraftModelProposer, load_draft_model
from jaxpaged.engine.spec_decode.ngram_proposer import NgramDrafter
from jaxpaged.models import ModelConfig

Drafter = NgramDrafter | DraftModelProposer


def make_drafter(config: EngineConfig, target: ModelConfig, dtype, attention, buckets: list[int],
                 mesh: Mesh | None = None) -> Drafter | None:
    """The drafter of `config.speculative_config` (None: no speculation), for an engine whose
    sizes are set (`max_model_len`, `max_num_seqs`) and whose step programs use `buckets`; a
    draft model is sharded on the target's `mesh` as the target is."""
    spec = config.speculative_config
    if spec is None:
        return None
    if spec.method == "ngram":
        return NgramDrafter(spec, config.max_model_len)
    return DraftModelProposer(spec, config.max_model_len,
                              *load_draft_model(spec, target, dtype, config.load_format, config.max_model_len, mesh),
                              attention, config.block_size, config.max_num_seqs, buckets, mesh)
