"""HF transformers' copy of the default model: the GGUF dequantized by transformers, and saved
once as an HF folder (safetensors) for vLLM, which cannot load the GGUF itself.

bench.engine_throughput times the HF model beside splitserve; bench.goodput serves the folder
with ``vllm serve``. The folder lives in CACHE_DIR and is written again only when the GGUF changes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from bench.common import CACHE_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # too late if tqdm is imported already (torch imports it)


def load_hf_model(gguf_path: Path):
    """transformers' model of the GGUF, dequantized to fp32, in eval mode."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


def export_hf_folder(gguf_path: Path, model=None) -> Path:
    """Save HF's dequantization of the GGUF as an HF folder (safetensors) once, for vLLM."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    folder = CACHE_DIR / f"{gguf_path.stem}-hf"
    source = {"gguf": str(gguf_path), "size": gguf_path.stat().st_size, "mtime": gguf_path.stat().st_mtime}
    marker = folder / "source.json"
    if marker.exists() and json.loads(marker.read_text()) == source:
        return folder
    if model is None:
        model = load_hf_model(gguf_path)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=CACHE_DIR))  # renamed when complete
    tied = model.config.tie_word_embeddings
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain fp32 now
    config["architectures"] = [type(model).__name__]
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    model.generation_config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps(source))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
