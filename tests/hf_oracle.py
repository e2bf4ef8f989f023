"""HF transformers as the oracle of jaxpaged's logits: the model in float32, every position."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers


def hf_logits_of(model_dir: str | Path) -> Callable[[list[int]], np.ndarray]:
    """`f(ids)`: HF's logits after each of `ids` ([len(ids), V], float64)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def f(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            t = torch.tensor([ids])  # explicit mask: HF would otherwise mask token 0 (= pad)
            return hf(t, attention_mask=torch.ones_like(t)).logits[0].double().numpy()

    return f


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis."""
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
