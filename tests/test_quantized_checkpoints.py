"""Quantized checkpoints of a tiny Llama (its LM head made decisive) written as compressed-tensors (FP8-dynamic, static
FP8, FP8_BLOCK, pack-quantized W4A16 / W8A16, int-quantized W8A8), NVIDIA ModelOpt FP8, block fp8
(`weight_block_size`), AutoAWQ GEMM and GPTQ (asymmetric, symmetric, act-order) lay them out
(tests/_quant_checkpoints.py), loaded by jaxpaged and run against HF transformers on the
dequantized weights: weight-only schemes to float32 rounding, W8A8 (fp8, int8) within its
activation rounding, with the same greedy tokens up to a step where the oracle's margin is
within that; then served through `LLM` on two devices with the weights sharded field by field."""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.kernels.paged_attention import paged_attention_ref
from jaxpaged.models import load_model, make_forward, param_specs
from jaxpaged.models.kv_cache import init_kv_cache
from jaxpaged.models.quantization import Fp8BlockWeight, Fp8Weight, Int4Weight, Int8W8A8Weight, Int8Weight
from jaxpaged.models.step_input import make_step_input

sys.path.insert(0, str(Path(__file__).parent))
from _quant_checkpoints import decisive_copy, write_quantized  # noqa: E402

KINDS = {"ct-fp8-dynamic": Fp8Weight, "ct-fp8-static": Fp8Weight, "modelopt-fp8": Fp8Weight, "fbgemm-fp8": Fp8Weight,
         "awq": Int4Weight,
         "gptq": Int4Weight, "gptq-sym": Int4Weight, "gptq-act-order": Int4Weight, "gptq-8bit": Int8Weight,
         "gptq-8bit-act-order": Int8Weight, "fp8-block": Fp8BlockWeight,
         "ct-fp8-block": Fp8BlockWeight, "ct-w4a16": Int4Weight, "ct-w4a16-asym": Int4Weight, "ct-w8a16": Int8Weight,
         "ct-w8a16-act-order": Int8Weight,
         "ct-w8a8-int8": Int8W8A8Weight}
WEIGHT_ONLY = (Int4Weight, Int8Weight, Fp8BlockWeight)  # float activations: the oracle's arithmetic
PROMPTS = np.random.default_rng(3).integers(3, 500, (8, 12)).tolist()  # equal lengths: no padding for HF
STEPS = 4
FP8_ERROR = 0.25  # most fp8 W8A8 logit error here (logits up to ~10): activations rounded to e4m3
FP8_MARGIN = 2 * FP8_ERROR  # an oracle's top-2 logit gap that fp8 cannot close


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    root, made = tmp_path_factory.mktemp("quantized"), {}
    src = decisive_copy(tiny_model_dir("llama"), root / "float")

    def get(fmt: str) -> tuple[Path, Path]:
        if fmt not in made:
            made[fmt] = write_quantized(src, root, fmt)
        return made[fmt]

    return get


def transformers_greedy(model_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HF on the dequantized checkpoint: the prompts' logits [8, 12, V], greedy tokens [8, STEPS]
    and each greedy step's top-2 margin [8, STEPS]."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor(PROMPTS)
    with torch.no_grad():
        logits = model(ids).logits.numpy()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=STEPS,
                             min_new_tokens=STEPS, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    top2 = np.sort(np.stack([s.numpy() for s in out.scores], 1), -1)[..., -2:]
    return logits, out.sequences[:, len(PROMPTS[0]):].numpy(), top2[..., 1] - top2[..., 0]


def jaxpaged_greedy(cfg, params) -> tuple[np.ndarray, np.ndarray]:
    """The prompts' logits [8, 12, V] (one prefill step) and greedy tokens [8, STEPS] through the
    paged cache (one decode step per token, all prompts batched)."""
    forward = make_forward(cfg, paged_attention_ref)
    kv = init_kv_cache(cfg, 1 + 8 * 2, 16, jnp.float32)
    tables = [[1 + 2 * i, 2 + 2 * i] for i in range(8)]
    step = make_step_input([(p, 0, t) for p, t in zip(PROMPTS, tables)], 16, num_tokens=128, all_logits=True)
    logits, kv = forward(params, kv, step)
    logits = np.asarray(logits).reshape(8, len(PROMPTS[0]), -1)
    tokens = [logits[:, -1].argmax(-1)]
    for j in range(1, STEPS):
        pos = len(PROMPTS[0]) + j - 1
        step = make_step_input([([int(tok)], pos, t) for tok, t in zip(tokens[-1], tables)], 16, num_tokens=8)
        out, kv = forward(params, kv, step)
        tokens.append(np.asarray(out).argmax(-1))
    return logits, np.stack(tokens, 1)


@pytest.mark.parametrize("fmt", list(KINDS))
def test_checkpoint_matches_transformers_on_its_dequantized_weights(fmt, checkpoints):
    quantized, dequantized = checkpoints(fmt)
    cfg, params = load_model(quantized, dtype="float32")
    _, dense = load_model(dequantized, dtype="float32")
    kind = KINDS[fmt]
    for layer, want in zip(params["layers"], dense["layers"]):  # each leaf holds the dequantized weights
        for key in ("wqkv", "wo", "w_gate_up", "w_down"):
            assert type(layer[key]) is kind, key
            np.testing.assert_allclose(layer[key].dequantize(), want[key], rtol=1e-6, atol=1e-9, err_msg=key)
    assert isinstance(params["lm_head"], Int4Weight) == (fmt == "gptq-sym")
    if kind is Fp8Weight:
        assert (params["layers"][0]["wqkv"].input_scale is not None) == (fmt in ("ct-fp8-static", "modelopt-fp8"))
        ub = params["layers"][0]["wqkv"].input_scale_ub  # FBGEMM's cap of the per-token activation scale
        assert (None if ub is None else float(ub)) == (1200.0 if fmt == "fbgemm-fp8" else None)
    if kind in (Int4Weight, Int8Weight):  # act-order rows are stored sorted by group; consecutive groups need no order
        act_order = fmt in ("gptq-act-order", "ct-w4a16-asym", "gptq-8bit-act-order", "ct-w8a16-act-order")
        assert (params["layers"][0]["w_down"].perm is not None) == act_order
    logits, tokens = jaxpaged_greedy(cfg, params)
    ref_logits, ref_tokens, margins = transformers_greedy(dequantized)
    if kind in WEIGHT_ONLY:  # the dequantized weights exactly, float32 arithmetic
        np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
        np.testing.assert_array_equal(tokens, ref_tokens)
        return
    # W8A8 (fp8, int8): the activations are rounded per token (or at the static scale)
    err = np.abs(logits - ref_logits)
    assert np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits) < 0.08 and err.max() < FP8_ERROR
    decisive = 0  # greedy steps equal so far whose oracle margin exceeds fp8's error
    for row, ref_row, margin in zip(tokens, ref_tokens, margins):
        for j in range(STEPS):
            if row[j] != ref_row[j]:  # only a close call may go the other way (the rest then differs)
                assert margin[j] < FP8_MARGIN, (row, ref_row, margin)
                break
            decisive += margin[j] > FP8_MARGIN
    assert decisive >= 3, margins


def test_two_devices_shard_each_field_and_serve_the_same_tokens(checkpoints):
    """LLM(...) with tensor_parallel_size=2 on the AWQ checkpoint: packed weights, group scales
    and zeros split along the input rows of o/down and the output channels of q/k/v and
    gate/up; greedy tokens equal HF's on the dequantized weights."""
    from jaxpaged import LLM, SamplingParams

    quantized, dequantized = checkpoints("awq")
    llm = LLM(str(quantized), dtype="float32", tensor_parallel_size=2, max_model_len=64, block_size=4,
              max_num_seqs=8, max_num_batched_tokens=32, num_kv_blocks=40)
    params, cfg = llm.engine.runner.params, llm.engine.model_config
    got = jax.tree.map(lambda a: a.sharding.spec, params)
    assert got == param_specs(cfg, params)
    wo = params["layers"][0]["wo"]
    assert [f.addressable_shards[0].data.shape for f in (wo.qweight, wo.scales, wo.zeros)] == [(4, 64), (1, 64), (1, 64)]
    assert params["layers"][0]["wqkv"].qweight.addressable_shards[0].data.shape == (8, 1, 4, 16)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True), use_tqdm=False)
    assert llm.engine.core.info.quantization == "awq"
    np.testing.assert_array_equal([o.outputs[0].token_ids for o in outs], transformers_greedy(dequantized)[1])


@pytest.mark.parametrize("fmt", ["modelopt-fp8", "fp8-block"])
def test_fp8_on_four_devices_matches_one(fmt, checkpoints):
    """ModelOpt FP8 (static activation scales) and block fp8 on a 4-device mesh, each of the 2 KV
    heads replicated twice (their scales with them): the same logits as on one device. Block
    scales split with their weight where the mesh divides them (q/k/v's output channels), else
    stay whole (o's 2 input blocks on 4 devices)."""
    from jaxpaged.engine.mesh import make_mesh

    quantized, _ = checkpoints(fmt)
    cfg, params = load_model(quantized, dtype="float32")
    want, _ = jaxpaged_greedy(cfg, params)
    mesh = make_mesh(4)
    cfg2, sharded = load_model(quantized, dtype="float32", mesh=mesh)
    wqkv = sharded["layers"][0]["wqkv"]
    assert cfg2.kv_head_replicas == 2 and wqkv.qweight.addressable_shards[0].data.shape == (1, 3, 16, 64)
    assert wqkv.qweight.sharding.spec == jax.sharding.PartitionSpec("tp", None, None, None)
    if fmt == "modelopt-fp8":
        assert wqkv.input_scale.sharding.is_fully_replicated
    else:
        assert wqkv.scale.sharding.spec == wqkv.qweight.sharding.spec
        assert wqkv.scale.addressable_shards[0].data.shape == (1, 3, 16, 2)
        wo = sharded["layers"][0]["wo"]
        assert wo.qweight.addressable_shards[0].data.shape == (64, 16) and wo.scale.sharding.is_fully_replicated
    assert_same_logits_on(mesh, cfg2, sharded, want)


def test_act_order_on_two_devices_matches_one(checkpoints):
    """GPTQ act-order on a 2-device mesh: the rows stored sorted by group split like any int4
    weight's (o/down along their input rows, each device whole groups), the row order `perm`
    replicated (it indexes the whole activation row); the same logits as on one device."""
    from jaxpaged.engine.mesh import make_mesh

    quantized, _ = checkpoints("gptq-act-order")
    cfg, params = load_model(quantized, dtype="float32")
    want, _ = jaxpaged_greedy(cfg, params)
    mesh = make_mesh(2)
    cfg2, sharded = load_model(quantized, dtype="float32", mesh=mesh)
    wo = sharded["layers"][0]["wo"]
    assert wo.perm is not None and wo.perm.sharding.is_fully_replicated and wo.layout is not None
    assert [f.addressable_shards[0].data.shape for f in (wo.qweight, wo.scales)] == [(4, 64), (1, 64)]
    assert_same_logits_on(mesh, cfg2, sharded, want)


def assert_same_logits_on(mesh, cfg, sharded: dict, want: np.ndarray) -> None:
    """The prefill logits of PROMPTS with the params `sharded` on `mesh` equal `want` (one device's)."""
    from jax.sharding import NamedSharding

    from jaxpaged.engine.mesh import shard_attention
    from jaxpaged.models.sharding import KV_POOL

    forward = make_forward(cfg, shard_attention(paged_attention_ref, mesh))
    kv = init_kv_cache(cfg, 1 + 8 * 2, 16, jnp.float32, NamedSharding(mesh, KV_POOL))
    step = make_step_input([(p, 0, [1 + 2 * i, 2 + 2 * i]) for i, p in enumerate(PROMPTS)], 16, num_tokens=128,
                           all_logits=True)
    got, _ = forward(sharded, kv, step)
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, atol=2e-5)
