"""`omni convert-hubert`: a fairseq HuBERT checkpoint (mHuBERT) → a transformers `HubertModel` directory.

The units of the released vocoder come from mHuBERT base (`mhubert_base_vp_en_es_fr_it3.pt`),
a fairseq checkpoint. transformers' own converter needs fairseq installed; this one needs
neither fairseq nor omegaconf and never unpickles arbitrary objects:

- The checkpoint is read with `torch.load(weights_only=True)`. The configuration objects such
  checkpoints hold besides tensors — `argparse.Namespace` (older ones), omegaconf `DictConfig`
  trees and fairseq config/enum/dictionary classes (newer ones) — are allowed under their own
  names, the omegaconf/fairseq ones as inert stand-ins that only keep what the file says (no
  code of theirs exists here to run). Every global the pickle names is listed before loading,
  and any other one (`os.system`, `builtins.eval`, ...) is refused with its name.
- The model config is read from `cfg["model"]` or `args`, fairseq's defaults filling gaps;
  weights are renamed to transformers' names, and every weight must be used and every
  parameter filled (the pretraining heads `final_proj` / `label_embs_concat` are dropped).
- The result (config.json + model.safetensors) is written to a new directory atomically.
"""

from __future__ import annotations

import argparse
import ast
import pickletools
import re
import types
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omni_cli.errors import CheckpointError, ConfigError, one_line

# fairseq's HubertConfig defaults (HuBERT base), for fields a checkpoint's config leaves out.
FAIRSEQ_DEFAULTS: dict[str, Any] = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "conv_bias": False,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "layer_norm_first": False,
}
# Modules whose classes hold configuration in fairseq checkpoints: read as inert data.
CONFIG_MODULES = ("omegaconf", "fairseq", "typing")
# Globals torch's weights-only unpickler judges itself (tensor rebuilding, storages, OrderedDict).
_TORCH_JUDGES = ("torch", "collections.OrderedDict", "collections.Counter", "_codecs.encode",
                 "builtins.set", "builtins.bytearray", "builtins.complex")
_PLAIN_BUILTINS = {t.__name__: t for t in (dict, list, tuple, int, float, str, bool, bytes, frozenset)}
# Weights of HuBERT's pretraining heads (label prediction), not part of HubertModel.
PRETRAINING_ONLY = re.compile(r"label_embs_concat|label_embs|final_proj\.(weight|bias)")

# fairseq name → transformers name (with the conv-feature norms handled by mode below).
_RENAMES = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)", r"feature_extractor.conv_layers.0.layer_norm.\1"),
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"mask_emb", r"masked_spec_embed"),
    (r"encoder\.pos_conv\.0\.bias", r"encoder.pos_conv_embed.conv.bias"),
    (r"encoder\.pos_conv\.0\.weight_g", r"encoder.pos_conv_embed.conv.WEIGHT_G"),
    (r"encoder\.pos_conv\.0\.weight_v", r"encoder.pos_conv_embed.conv.WEIGHT_V"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.self_attn\.([kvq])_proj\.(weight|bias)", r"encoder.layers.\1.attention.\2_proj.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"encoder.layers.\1.attention.out_proj.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
]
# transformers keeps the positional conv's weight norm as weight_g/weight_v or as parametrizations.
_WEIGHT_NORM_NAMES = (("weight_g", "weight_v"), ("parametrizations.weight.original0", "parametrizations.weight.original1"))


class ConfigObject:
    """Stands in for a fairseq/omegaconf class named in a checkpoint: keeps its arguments and state, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> ConfigObject:
        obj = super().__new__(cls)
        obj.args, obj.state = args, {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = state if isinstance(state, dict) else {"value": state}


def _stand_in(module: str, name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (ConfigObject,), {"__module__": module, "__qualname__": name})


def _named(func: Callable[..., Any], module: str, name: str) -> Callable[..., Any]:
    """`func` under the name a checkpoint gives it (torch matches allowed globals by `module.qualname`)."""

    def call(*args: Any) -> Any:
        return func(*args)

    call.__module__, call.__qualname__ = module, name
    return call


def pickle_globals(path: Path) -> set[tuple[str, str]]:
    """Every (module, name) the checkpoint's pickle names, read without unpickling (zip or legacy torch format)."""
    found: set[tuple[str, str]] = set()

    def scan(stream: Any) -> None:
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                # Python 2 names (protocol 2 writes __builtin__.dict), mapped as unpicklers do.
                if (module, name) in NAME_MAPPING:
                    module, name = NAME_MAPPING[(module, name)]
                found.add((IMPORT_MAPPING.get(module, module), name))
            elif opcode.name == "STACK_GLOBAL":  # names from the stack: cannot be listed, so not allowed
                raise CheckpointError(f"{path} uses a pickle protocol torch.save does not write; refusing to load it.")

    try:
        # torch.load takes a file for a zip by its first bytes, zipfile by the directory at its end: a file
        # where they disagree would have one pickle listed here and another one loaded.
        with path.open("rb") as handle:
            starts_as_zip = handle.read(4) == b"PK\x03\x04"
        if starts_as_zip != zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path} is not a torch checkpoint: its zip archive does not match its start (a file made to mislead "
                "readers?); refusing to load it."
            )
        if starts_as_zip:
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith("data.pkl"):
                        scan(archive.read(member))
        else:
            with path.open("rb") as handle:
                for _ in range(4):  # magic number, protocol, system info, then the object itself
                    scan(handle)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files fail in many ways
        raise CheckpointError(f"{path} is not a torch checkpoint ({one_line(exc)}); expected a fairseq HuBERT .pt file.") from exc
    return found


def allowed_globals(path: Path, names: set[tuple[str, str]]) -> list[Any]:
    """What `torch.serialization.safe_globals` gets for this checkpoint; a name outside the allow-list is refused."""
    import numpy as np

    from omni_cli.train.kmeans_pickle import NUMPY_GLOBALS

    allowed: list[Any] = []
    for module, name in sorted(names):
        full = f"{module}.{name}"
        if module.split(".")[0] == "torch" or full in _TORCH_JUDGES:
            continue
        if full == "argparse.Namespace":
            allowed.append(argparse.Namespace)
        elif module == "builtins" and name in _PLAIN_BUILTINS:
            allowed.append(_PLAIN_BUILTINS[name])
        elif full == "collections.defaultdict":  # omegaconf's resolver caches: kept as a plain dict
            allowed.append(_named(lambda *args: {}, module, name))
        elif module.split(".")[0] in CONFIG_MODULES:
            allowed.append(_stand_in(module, name))
        elif (module, name) in NUMPY_GLOBALS:  # numbers saved as numpy scalars
            found = NUMPY_GLOBALS[(module, name)]
            allowed.append(found if isinstance(found, type) and f"{found.__module__}.{found.__qualname__}" == full else _named(found, module, name))
            if found is np.dtype:  # a dtype is built by REDUCE, then its class (Float64DType, ...) gets BUILD
                allowed.extend(t for t in vars(getattr(np, "dtypes", types.SimpleNamespace())).values() if isinstance(t, type))
        elif module == "numpy.dtypes" and isinstance(getattr(getattr(np, "dtypes", None), name, None), type):
            allowed.append(getattr(np.dtypes, name))
        else:
            raise CheckpointError(
                f"{path} holds {full}, which a HuBERT checkpoint does not; refusing to load it "
                "(only tensors and configuration data are read, so a file cannot run code)."
            )
    return allowed


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's top-level dict, read weights-only with the config objects as inert data."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"HuBERT checkpoint {path} not found; download it (`omni download llama-omni-8b --units`).")
    allowed = allowed_globals(path, pickle_globals(path))
    if not hasattr(torch.serialization, "safe_globals"):
        raise CheckpointError(f"torch {torch.__version__} cannot allow-list config objects; convert-hubert needs torch ≥ 2.5.")
    try:
        with torch.serialization.safe_globals(allowed):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - weights-only refusals, truncated zips, bad storages
        raise CheckpointError(f"{path} does not load as a HuBERT checkpoint ({refusal_reason(exc)}).") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} has no 'model' weights: it is not a fairseq checkpoint.")
    return ckpt


def refusal_reason(exc: BaseException) -> str:
    """torch.load's reason for refusing a file, in one line, without its advice: it suggests
    `weights_only=False` (which runs whatever the file holds) or allow-listing what the file names."""
    text = str(exc).split("WeightsUnpickler error:")[-1].replace("Weights only load failed.", "")
    for line in text.splitlines():
        line = re.split(r"\s(?:Please use|Please file|Re-running|Check the documentation)", line)[0].strip()
        if line and "weights_only" not in line:
            return line
    return type(exc).__name__


def plain(value: Any) -> Any:
    """Config data as plain Python: Namespaces and omegaconf trees (their `_content` / `_val`) become dicts and values."""
    if isinstance(value, argparse.Namespace):
        return {k: plain(v) for k, v in vars(value).items()}
    if isinstance(value, ConfigObject):
        state = value.state
        if "_content" in state:  # DictConfig / ListConfig
            return plain(state["_content"])
        if "_val" in state:  # a value node
            return plain(state["_val"])
        if len(value.args) == 1 and not state:  # an enum member, rebuilt from its value
            return plain(value.args[0])
        return {k: plain(v) for k, v in state.items() if not k.startswith("_")}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def model_settings(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The model's fairseq settings: `cfg["model"]` (hydra-era checkpoints) or `args` (older ones), defaults filled."""
    cfg = plain(ckpt.get("cfg"))
    settings = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(settings, dict):
        settings = plain(ckpt.get("args"))
    if not isinstance(settings, dict):
        raise CheckpointError("the checkpoint holds neither cfg['model'] nor args: it is not a fairseq HuBERT checkpoint.")
    return {key: default if settings.get(key) is None else settings[key] for key, default in FAIRSEQ_DEFAULTS.items()}


def conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """fairseq's `conv_feature_layers` ("[(512,10,5)] + [(512,3,2)] * 4 + ...") read without eval."""

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(n) for n in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(ast.dump(node))

    try:
        layers = value(ast.parse(spec, mode="eval").body)
        if not layers or not all(isinstance(t, tuple) and len(t) == 3 and all(isinstance(x, int) for x in t) for t in layers):
            raise ValueError(spec)
    except (SyntaxError, ValueError, TypeError, MemoryError) as exc:
        raise ConfigError(f"conv_feature_layers {spec!r} is not a list of (dim, kernel, stride) tuples.") from exc
    return layers


def hubert_config(settings: dict[str, Any]) -> Any:
    """transformers' HubertConfig for these fairseq settings (the mapping transformers' own converter uses)."""
    from transformers import HubertConfig

    mode = settings["extractor_mode"]
    if mode not in ("default", "layer_norm"):
        raise ConfigError(f"extractor_mode {mode!r} is not one fairseq's HuBERT has ('default' or 'layer_norm').")
    layers = conv_layers(str(settings["conv_feature_layers"]))
    return HubertConfig(
        hidden_size=int(settings["encoder_embed_dim"]),
        num_hidden_layers=int(settings["encoder_layers"]),
        num_attention_heads=int(settings["encoder_attention_heads"]),
        intermediate_size=int(settings["encoder_ffn_embed_dim"]),
        hidden_act=str(settings["activation_fn"]),
        conv_dim=[c[0] for c in layers],
        conv_kernel=[c[1] for c in layers],
        conv_stride=[c[2] for c in layers],
        num_feat_extract_layers=len(layers),
        conv_bias=bool(settings["conv_bias"]),
        feat_extract_norm="layer" if mode == "layer_norm" else "group",
        feat_proj_layer_norm=True,  # fairseq's `layer_norm` over the conv features
        num_conv_pos_embeddings=int(settings["conv_pos"]),
        num_conv_pos_embedding_groups=int(settings["conv_pos_groups"]),
        do_stable_layer_norm=bool(settings["layer_norm_first"]),
        layer_norm_eps=1e-5,
    )


def rename_weights(weights: dict[str, Any], targets: dict[str, Any]) -> dict[str, Any]:
    """fairseq tensors under transformers' names; an unknown fairseq key or an unfilled parameter is an error naming it."""
    g_name, v_name = next(pair for pair in _WEIGHT_NORM_NAMES if f"encoder.pos_conv_embed.conv.{pair[0]}" in targets)
    renamed: dict[str, Any] = {}
    for key, tensor in weights.items():
        if PRETRAINING_ONLY.fullmatch(key):
            continue
        new = next((re.sub(rf"^{pattern}$", repl, key) for pattern, repl in _RENAMES if re.fullmatch(pattern, key)), None)
        if new is None:
            raise CheckpointError(f"the checkpoint's weight {key!r} has no place in HubertModel; it is not a HuBERT checkpoint.")
        new = new.replace("WEIGHT_G", g_name).replace("WEIGHT_V", v_name)
        if new not in targets:
            raise CheckpointError(f"the checkpoint's weight {key!r} does not fit this model's layout ({new} does not exist).")
        if tuple(tensor.shape) != tuple(targets[new].shape):
            raise CheckpointError(f"the checkpoint's weight {key!r} has shape {tuple(tensor.shape)}, the config gives {tuple(targets[new].shape)}.")
        renamed[new] = tensor
    missing = sorted(set(targets) - set(renamed))
    if missing:
        raise CheckpointError(f"the checkpoint lacks the weight for {missing[0]} ({len(missing)} missing); it is not a complete HuBERT checkpoint.")
    return renamed


def _weights(ckpt: dict[str, Any]) -> dict[str, Any]:
    import torch

    weights = ckpt["model"]
    bad = [k for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"the checkpoint's model entry {bad[0]!r} is not a tensor.")
    return weights


def convert_hubert(src: str | Path, dst: str | Path) -> Path:
    """Convert the fairseq checkpoint `src` into a new transformers HubertModel directory `dst`; returns `dst`."""
    import torch
    from transformers import HubertModel

    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(f"{dst} already exists; give convert-hubert a new directory.")
    ckpt = read_checkpoint(src)
    try:
        config = hubert_config(model_settings(ckpt))
    except ConfigError as exc:
        raise ConfigError(f"{src}: {exc}") from exc
    with torch.device("meta"):
        targets = HubertModel(config).state_dict()
    try:
        renamed = rename_weights(_weights(ckpt), targets)
    except CheckpointError as exc:
        raise CheckpointError(f"{src}: {exc}") from exc
    model = HubertModel(config)
    model.load_state_dict({k: v.float() for k, v in renamed.items()}, strict=True)
    from omni_cli.train.checkpoints import write_directory

    # Atomic, as checkpoints are written: `dst` appears complete or not at all (an empty one is replaced).
    try:
        return write_directory(dst, lambda tmp: model.save_pretrained(str(tmp), safe_serialization=True))
    except OSError as exc:
        raise CheckpointError(f"cannot write {dst} ({exc.strerror or one_line(exc)}); choose a writable place for the new folder.") from exc


__all__ = ["convert_hubert", "read_checkpoint", "model_settings", "hubert_config", "conv_layers", "plain", "ConfigObject"]
