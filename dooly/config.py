"""Reading a model's `config.json` and checking it before anything is built from it.

Any `model_type` transformers has a config class for is accepted. The class says what the fields are called
(`attribute_map`: GPT-2's `n_embd` is `hidden_size`) and, for a composite config (a vision-language model), which
part is the text model the serving engine runs (`get_text_config()`); the checks read that part.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from pathlib import Path

from .errors import DoolyError

# Every decoder LLM has these, whatever its class calls them
REQUIRED_FIELDS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
# Fields that size tensors wherever a config gives them: a value that is not a positive integer is refused here,
# before transformers or the model's code meets it.
SIZE_FIELDS = REQUIRED_FIELDS + (
    "intermediate_size", "num_key_value_heads", "head_dim", "num_local_experts", "num_experts",
    "num_experts_per_tok", "moe_intermediate_size",
)
# The fields the vLLM frontend makes symbols of
SHAPE_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
)
# Capture builds the full-depth model once (on the meta device) to compare its layers: depth bounds that work
MAX_LAYERS = 1024
ACTIVATION_FIELDS = ("hidden_act", "hidden_activation", "activation_function")
FLOAT_SUFFIXES = ("_eps", "rope_theta", "epsilon")


@dataclass(frozen=True)
class ModelConfig:
    name: str  # the file's stem, e.g. "llama-3.1-8b"
    model_type: str
    data: dict
    num_layers: int  # decoder layers of the text model
    text_key: str | None = None  # where a composite config keeps its text model ("text_config"), None if top level


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _config_class(model_type, where: str):
    from transformers import CONFIG_MAPPING, __version__

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise DoolyError(f"{where}: unknown architecture {model_type!r}: transformers {__version__} has no config "
                         f"class for it")
    return CONFIG_MAPPING[model_type]


def _text_key(cls) -> str | None:
    """The key of a composite config's text model, read off a default instance of the class."""
    try:
        default = cls()
    except Exception:  # noqa: BLE001 - a class without defaults: treat the config as flat
        return None
    text = default.get_text_config()
    return next((k for k in getattr(cls, "sub_configs", {}) if getattr(default, k, None) is text), None)


def _text_class(cls, key: str | None):
    return cls if key is None else cls.sub_configs[key]


def _given(data: dict, field: str, aliases: dict) -> str | None:
    """The key under which `data` gives `field`: its own name or the name the config class stores it under."""
    for key in (field, aliases.get(field)):
        if key is not None and data.get(key) is not None:
            return key
    return None


def _part_defaults(cls) -> dict:
    """The fields a default instance of a composite config's part holds: transformers writes a part as its
    differences from these (Gemma-3's `text_config` leaves out its 8 heads), so a field it omits has this value."""
    try:
        return cls().to_dict()
    except Exception:  # noqa: BLE001 - a class without defaults: every field must be given
        return {}


def _check_raw(text: dict, aliases: dict, where: str, max_layers: int, defaults: dict) -> None:
    layers_key = _given(text, "num_hidden_layers", aliases)
    layers = text.get(layers_key) if layers_key else None
    if _positive_int(layers) and layers > max_layers:
        raise DoolyError(f"{where}: num_hidden_layers is {layers}, over the limit of {max_layers} "
                         f"(--max-layers raises it)")
    for field in SIZE_FIELDS:
        key = _given(text, field, aliases)
        if key is not None and not _positive_int(text[key]):
            raise DoolyError(f"{where}: field {field!r} must be a positive integer, got {text[key]!r}")
    for field in REQUIRED_FIELDS:
        if _given(text, field, aliases) is None and _given(defaults, field, aliases) is None:
            raise DoolyError(f"{where}: required field {field!r} is missing")


def _check_built(text, where: str) -> None:
    """What the config class accepts but the model's code would fail on, in the model's terms."""
    from transformers.activations import ACT2FN
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for field in ACTIVATION_FIELDS:
        act = getattr(text, field, None)
        if isinstance(act, str) and act not in ACT2FN:
            raise DoolyError(f"{where}: unknown activation {field}={act!r}")
    rope = getattr(text, "rope_parameters", None) or {}
    for params in [rope] if "rope_type" in rope or "rope_theta" in rope else list(rope.values()):
        if not isinstance(params, dict):
            continue
        kind = params.get("rope_type", "default")
        if kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
            raise DoolyError(f"{where}: unknown rope_type {kind!r} "
                             f"(transformers knows default, {', '.join(ROPE_INIT_FUNCTIONS)})")
        _check_number(params, "rope_theta", where)
    for field, value in vars(text).items():
        if field.endswith(FLOAT_SUFFIXES):
            _check_number({field: value}, field, where)
    heads, kv = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    if _positive_int(kv) and heads % kv:
        raise DoolyError(f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")


def _check_number(params: dict, field: str, where: str) -> None:
    """A number, or a list of numbers, one per layer (Granite-SWA's `layer_rope_theta`)."""
    value = params.get(field)
    real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)  # noqa: E731
    if value is not None and not (real(value) or isinstance(value, list) and value and all(map(real, value))):
        raise DoolyError(f"{where}: field {field!r} must be a number or a list of them, got {value!r}")


def parse_config(data, name: str, where: str, max_layers: int = MAX_LAYERS) -> ModelConfig:
    if not isinstance(data, dict):
        raise DoolyError(f"{where}: a config.json must hold a JSON object, not {type(data).__name__}")
    model_type = data.get("model_type")
    if model_type is None:
        raise DoolyError(f"{where}: no 'model_type' field: cannot tell the architecture")
    cls = _config_class(model_type, where)
    key = _text_key(cls)
    text_data = data if key is None else data.get(key)
    if not isinstance(text_data, dict):
        raise DoolyError(f"{where}: {model_type} is a composite config and its text model ({key!r}) is missing")
    text_cls = _text_class(cls, key)
    defaults = {} if key is None else _part_defaults(text_cls)
    _check_raw(text_data, getattr(text_cls, "attribute_map", {}), where, max_layers, defaults)
    text = build(model_type, data, where).get_text_config()
    _check_built(text, f"{where}: {model_type}")
    return ModelConfig(name, model_type, data, text.num_hidden_layers, key)


def build(model_type: str, data: dict, where: str):
    """The transformers config object of `data`; what its class refuses is one DoolyError naming it."""
    from transformers import AutoConfig
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its warnings about a bad field would print beside the one error line
    try:
        return AutoConfig.for_model(model_type, **{k: v for k, v in data.items() if k != "model_type"})
    except Exception as e:  # noqa: BLE001 - whatever the class raises is the reason to give
        raise DoolyError(f"{where}: {model_type}: transformers rejects this config: {first_line(e)}") from None
    finally:
        logging.set_verbosity(verbosity)


def hf_config(cfg: ModelConfig, **overrides):
    """The transformers config object of a model, `head_dim` named where the class derives it."""
    config = build(cfg.model_type, {**cfg.data, **overrides}, cfg.name)
    if getattr(config, "head_dim", None) is None:
        # The models read `getattr(config, "head_dim", hidden_size // num_attention_heads)`; naming it makes it a
        # field of its own, which the taint pass can recover where rotary embeddings pin it to a number.
        config.head_dim = config.hidden_size // config.num_attention_heads
    return config


def first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def load_config(path: str | Path, max_layers: int = MAX_LAYERS) -> ModelConfig:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DoolyError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DoolyError(f"{path}: is a directory, expected a config.json file") from None
    except OSError as e:
        raise DoolyError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DoolyError(f"{path}: not UTF-8 text (byte {e.start} is {raw[e.start]:#04x})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DoolyError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise DoolyError(f"{path}: JSON nested too deeply to be a config") from None
    return parse_config(data, path.stem, str(path), max_layers)
