"""A model named as vLLM users name it: a local directory, or a Hugging Face hub id resolved
through `huggingface_hub` (the local cache first, `HF_HUB_OFFLINE` honoured, then a download)."""
from __future__ import annotations

from pathlib import Path

WEIGHTS_AND_TOKENIZER = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # what a download fetches


def resolve_model(model: str, revision: str | None = None, download_dir: str | None = None) -> str:
    """`model`'s local directory; ValueError in one line when it is neither here nor downloadable."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None or download_dir is not None:
            raise ValueError(f"{model} is a local directory: a revision or download directory applies to hub ids only")
        return str(path)
    from huggingface_hub import constants, snapshot_download

    where = download_dir or constants.HF_HUB_CACHE
    try:
        return snapshot_download(model, revision=revision, cache_dir=download_dir, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or not a repo id): try the hub unless offline
        if constants.HF_HUB_OFFLINE:
            raise ValueError(f"model {model!r} is not a local directory and not in the Hugging Face cache "
                             f"{where} (HF_HUB_OFFLINE is set)") from None
    try:
        return snapshot_download(model, revision=revision, cache_dir=download_dir,
                                 allow_patterns=WEIGHTS_AND_TOKENIZER)
    except Exception as e:  # noqa: BLE001 - any failure is the same message to the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model {model!r} is not a local directory and could not be downloaded: {reason}") from None
