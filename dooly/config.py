"""Reading a model's `config.json` and checking it before anything is built from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import DoolyError

# model_type -> the fields a config of that architecture must give as positive integers
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": (), "mistral": (), "qwen2": (), "qwen3": (), "gemma2": (), "phi3": (), "cohere2": (),
    "mixtral": ("num_local_experts", "num_experts_per_tok"),
    "qwen3_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    # run by the vllm frontend only (transformers' paged cache takes none of them)
    "deepseek_v3": ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
    "qwen3_next": ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "linear_num_key_heads",
                   "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim"),
    "llama4_text": ("num_local_experts", "num_experts_per_tok", "intermediate_size_mlp", "attention_chunk_size"),
}
COMMON_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")

# Config fields that size tensors. Capture makes each one a symbol, so a dim is attributed to the field it was
# computed from, never to whichever field happens to hold the same number.
SHAPE_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
)


@dataclass(frozen=True)
class ModelConfig:
    name: str  # the file's stem, e.g. "llama-3.1-8b"
    model_type: str
    data: dict

    @property
    def shape_fields(self) -> dict[str, int]:
        return {f: self.data[f] for f in SHAPE_FIELDS if isinstance(self.data.get(f), int)}

    @property
    def num_layers(self) -> int:
        return self.data["num_hidden_layers"]


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def parse_config(data, name: str, where: str) -> ModelConfig:
    if not isinstance(data, dict):
        raise DoolyError(f"{where}: a config.json must hold a JSON object, not {type(data).__name__}")
    model_type = data.get("model_type")
    if model_type is None:
        raise DoolyError(f"{where}: no 'model_type' field: cannot tell the architecture")
    if model_type not in ARCHITECTURES:
        raise DoolyError(f"{where}: unsupported architecture {model_type!r} "
                         f"(Dooly knows {', '.join(sorted(ARCHITECTURES))})")
    for f in COMMON_FIELDS + ARCHITECTURES[model_type]:
        if f not in data:
            raise DoolyError(f"{where}: required field {f!r} is missing")
        if not _positive_int(data[f]):
            raise DoolyError(f"{where}: field {f!r} must be a positive integer, got {data[f]!r}")
    for f in SHAPE_FIELDS:
        if data.get(f) is not None and not _positive_int(data[f]):
            raise DoolyError(f"{where}: field {f!r} must be a positive integer, got {data[f]!r}")
    heads, kv = data["num_attention_heads"], data.get("num_key_value_heads") or data["num_attention_heads"]
    if heads % kv:
        raise DoolyError(f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")
    return ModelConfig(name, model_type, data)


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DoolyError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DoolyError(f"{path}: is a directory, expected a config.json file") from None
    except OSError as e:
        raise DoolyError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DoolyError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    return parse_config(data, path.stem, str(path))
