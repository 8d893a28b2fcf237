"""Hugging Face Hub ids wherever a model path is taken (`init_from`, `--checkpoint`, `--hf_dir`).

`resolve_model_path("Qwen/Qwen2.5-0.5B")` gives the local folder of that model: a path that exists locally always
wins; otherwise an `org/name` id is fetched by `huggingface_hub.snapshot_download` (config, weights, tokenizer and
template files only), which reuses its cache (HF_HOME / HF_HUB_CACHE) and honours HF_HUB_OFFLINE=1. Offline and
not cached is one clear error naming the id.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

# What a model folder needs here: its config, safetensors weights and index, tokenizer files and chat template.
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path: str) -> bool:
    """`org/name` that is not a local path."""
    return bool(_HUB_ID.match(str(path))) and not Path(path).exists()


def resolve_model_path(path: str) -> str:
    """A local path as it is; a Hub id -> the folder of its snapshot in the Hugging Face cache."""
    if not path or not is_hub_id(path):
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise FileNotFoundError(f"{path!r} is not a local path, and huggingface_hub (to fetch it as a Hub id) is "
                                f"not installed: pip install huggingface_hub") from None
    try:
        local = snapshot_download(path, allow_patterns=MODEL_FILES)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"{path!r} is not a local path and not in the Hugging Face cache, and the Hub cannot "
                                f"be reached (HF_HUB_OFFLINE=1, or no network): download it where there is network "
                                f"(`huggingface-cli download {path}`) or pass a local folder") from None
    except (RepositoryNotFoundError, HFValidationError) as e:
        raise FileNotFoundError(f"{path!r} is neither a local path nor a Hugging Face Hub model "
                                f"({type(e).__name__})") from None
    logging.info("%s: Hugging Face Hub snapshot at %s", path, local)
    return local
