"""Files in the formats of the released mHuBERT and k-means, built in-process with tiny sizes.

The HuBERT checkpoint has fairseq's state-dict names and the config objects fairseq checkpoints
hold (an omegaconf DictConfig tree, a plain cfg dict, or argparse args); the k-means file is a
fitted scikit-learn MiniBatchKMeans saved by joblib.dump or pickle. The classes are made
importable under their real module names only while pickling, so readers never find them.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import pickle
import sys
import types
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from omni_cli.train.hubert import conv_layers

DIM, FFN, HEADS, LAYERS, CONV_DIM, POS_KERNEL, POS_GROUPS = 16, 32, 2, 11, 8, 8, 2
CONV_SPEC = f"[({CONV_DIM},10,5)] + [({CONV_DIM},3,2)] * 4 + [({CONV_DIM},2,2)] * 2"
SETTINGS: dict[str, Any] = {
    "_name": "hubert", "extractor_mode": "default", "encoder_layers": LAYERS, "encoder_embed_dim": DIM,
    "encoder_ffn_embed_dim": FFN, "encoder_attention_heads": HEADS, "activation_fn": "gelu", "dropout": 0.1,
    "conv_feature_layers": CONV_SPEC, "conv_bias": False, "conv_pos": POS_KERNEL, "conv_pos_groups": POS_GROUPS,
    "layer_norm_first": False, "label_rate": 50, "final_dim": 4, "untie_final_proj": False, "feature_grad_mult": 0.1,
}


def fairseq_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under fairseq HubertModel's state-dict names and shapes (extractor_mode "default")."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, around: float = 0.0) -> torch.Tensor:
        return around + 0.2 * torch.randn(*shape, generator=g)

    sd: dict[str, torch.Tensor] = {}
    channels = 1
    for i, (dim, kernel, _) in enumerate(conv_layers(CONV_SPEC)):
        sd[f"feature_extractor.conv_layers.{i}.0.weight"] = r(dim, channels, kernel)
        channels = dim
    sd["feature_extractor.conv_layers.0.2.weight"], sd["feature_extractor.conv_layers.0.2.bias"] = r(CONV_DIM, around=1), r(CONV_DIM)
    sd["layer_norm.weight"], sd["layer_norm.bias"] = r(CONV_DIM, around=1), r(CONV_DIM)
    sd["post_extract_proj.weight"], sd["post_extract_proj.bias"] = r(DIM, CONV_DIM), r(DIM)
    sd["mask_emb"] = r(DIM)
    # weight_norm(dim=2) on Conv1d(DIM, DIM, POS_KERNEL, groups=POS_GROUPS), as fairseq's TransformerEncoder.
    sd["encoder.pos_conv.0.weight_g"] = r(1, 1, POS_KERNEL, around=1)
    sd["encoder.pos_conv.0.weight_v"] = r(DIM, DIM // POS_GROUPS, POS_KERNEL)
    sd["encoder.pos_conv.0.bias"] = r(DIM)
    sd["encoder.layer_norm.weight"], sd["encoder.layer_norm.bias"] = r(DIM, around=1), r(DIM)
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"], sd[p + f"self_attn.{proj}.bias"] = r(DIM, DIM), r(DIM)
        sd[p + "self_attn_layer_norm.weight"], sd[p + "self_attn_layer_norm.bias"] = r(DIM, around=1), r(DIM)
        sd[p + "fc1.weight"], sd[p + "fc1.bias"] = r(FFN, DIM), r(FFN)
        sd[p + "fc2.weight"], sd[p + "fc2.bias"] = r(DIM, FFN), r(DIM)
        sd[p + "final_layer_norm.weight"], sd[p + "final_layer_norm.bias"] = r(DIM, around=1), r(DIM)
    # The pretraining heads, which HubertModel has no place for.
    sd["label_embs_concat"], sd["final_proj.weight"], sd["final_proj.bias"] = r(1004, 4), r(4, DIM), r(4)
    return sd


# -- the config objects fairseq checkpoints hold, under their own module names -----------------------


def _classes() -> dict[str, dict[str, Any]]:
    """Minimal classes laid out as omegaconf 2.0 / fairseq pickle them (attributes only; pickled by name)."""

    class Metadata:
        def __init__(self, ref_type: Any, object_type: Any, optional: bool, key: Any, flags: dict) -> None:
            self.ref_type, self.object_type, self.optional, self.key, self.flags = ref_type, object_type, optional, key, flags

    class ContainerMetadata(Metadata):
        def __init__(self, key: Any, object_type: Any) -> None:
            super().__init__(Any, object_type, True, key, {})
            self.resolver_cache, self.key_type, self.element_type = defaultdict(dict), Any, Any

    class ValueNode:
        def __init__(self, value: Any, parent: Any, key: str) -> None:
            self._metadata, self._parent, self._val = Metadata(Any, None, True, key, {}), parent, value

    class AnyNode(ValueNode): ...
    class StringNode(ValueNode): ...
    class IntegerNode(ValueNode): ...
    class FloatNode(ValueNode): ...
    class BooleanNode(ValueNode): ...
    class EnumNode(ValueNode): ...

    class DictConfig:
        def __init__(self, content: dict, parent: Any = None, key: Any = None, object_type: Any = dict) -> None:
            self._metadata, self._parent, self._content = ContainerMetadata(key, object_type), parent, {}
            for k, v in content.items():
                self._content[k] = DictConfig(v, self, k) if isinstance(v, dict) else _node(v, self, k)

    def _node(value: Any, parent: Any, key: str) -> ValueNode:
        kind = {bool: BooleanNode, int: IntegerNode, float: FloatNode, str: StringNode}.get(type(value), AnyNode)
        return EnumNode(value, parent, key) if isinstance(value, enum.Enum) else kind(value, parent, key)

    class HubertConfig:  # fairseq's dataclass, named as the structured config's object_type
        pass

    class Dictionary:  # fairseq.data.dictionary.Dictionary, kept in task_state
        def __init__(self, symbols: list[str]) -> None:
            self.symbols, self.count, self.indices = symbols, [1] * len(symbols), {s: i for i, s in enumerate(symbols)}

    choices = enum.Enum("Choices", {"default": "default", "layer_norm": "layer_norm"})
    return {
        "omegaconf.base": {"Metadata": Metadata, "ContainerMetadata": ContainerMetadata},
        "omegaconf.nodes": {c.__name__: c for c in (ValueNode, AnyNode, StringNode, IntegerNode, FloatNode, BooleanNode, EnumNode)},
        "omegaconf.dictconfig": {"DictConfig": DictConfig},
        "fairseq.models.hubert.hubert": {"HubertConfig": HubertConfig},
        "fairseq.data.dictionary": {"Dictionary": Dictionary},
        "fairseq.dataclass.constants": {"Choices": choices},
    }


@contextlib.contextmanager
def fake_modules(classes: dict[str, dict[str, Any]]) -> Iterator[None]:
    """Make the classes importable under their real module names while pickling, then remove every trace."""
    names = {".".join(m.split(".")[: i + 1]) for m in classes for i in range(m.count(".") + 1)}  # parents too
    saved = {name: sys.modules.get(name) for name in names}
    for module_name in sorted(names):
        module = types.ModuleType(module_name)
        for name, cls in classes.get(module_name, {}).items():
            cls.__module__, cls.__qualname__ = module_name, name
            setattr(module, name, cls)
        sys.modules[module_name] = module
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def write_checkpoint(path: Path, style: str, weights: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> Path:
    """A fairseq checkpoint: `cfg` as an omegaconf tree ("dictconfig"), a plain dict ("container") or `args` ("namespace")."""
    classes = _classes()
    with fake_modules(classes):
        ckpt: dict[str, Any] = {"model": weights, "optimizer_history": [{"num_updates": 400000}], "extra_state": {
            "previous_training_time": 12.5, "best_loss": np.float64(1.25)}}
        if style == "namespace":
            ckpt["args"] = argparse.Namespace(arch="hubert", **SETTINGS)
            ckpt["cfg"] = None
        else:
            model = dict(SETTINGS)
            task = {"_name": "hubert_pretraining", "normalize": False, "labels": ["km"], "sample_rate": 16000}
            if style == "dictconfig":
                model["extractor_mode"] = classes["fairseq.dataclass.constants"]["Choices"]("default")
                cfg = classes["omegaconf.dictconfig"]["DictConfig"]({"model": model, "task": task})
                cfg._content["model"]._metadata.object_type = classes["fairseq.models.hubert.hubert"]["HubertConfig"]
            else:
                cfg = {"model": model, "task": task}
            ckpt["args"], ckpt["cfg"] = None, cfg
            dictionary = classes["fairseq.data.dictionary"]["Dictionary"]
            ckpt["task_state"] = {"dictionaries": [dictionary(["<s>", "<pad>", "</s>", "<unk>", "0", "1"])]}
        ckpt.update(extra or {})
        torch.save(ckpt, path)
    return path


def write_kmeans(path: Path, centres: np.ndarray, how: str, **extra: object) -> Path:
    """A fitted MiniBatchKMeans as fairseq's learn_kmeans.py leaves it, saved by joblib.dump or pickle.dump."""

    class MiniBatchKMeans:  # scikit-learn's class path; pickled like its BaseEstimator (attributes + version)
        def __getstate__(self) -> dict:
            return {**self.__dict__, "_sklearn_version": "0.24.2"}

    with fake_modules({"sklearn.cluster._kmeans": {"MiniBatchKMeans": MiniBatchKMeans}}):
        km = MiniBatchKMeans()
        km.__dict__.update(
            n_clusters=len(centres), init="k-means++", max_iter=100, batch_size=10000, verbose=1, compute_labels=False,
            random_state=None, tol=0.0, max_no_improvement=100, init_size=None, n_init=20, reassignment_ratio=0.0,
            cluster_centers_=centres, n_features_in_=centres.shape[1], _n_threads=2, n_iter_=7, n_steps_=70,
            _counts=np.arange(len(centres), dtype=np.float32), _ewa_inertia=np.float64(3.5), _ewa_inertia_min=np.float64(3.25),
            _no_improvement=0, inertia_=np.float64(1234.5), _init_size=3000, **extra,
        )
        if how == "joblib":
            joblib = pytest.importorskip("joblib", reason="joblib (a test extra) writes the release's format")
            joblib.dump(km, path)
        else:
            path.write_bytes(pickle.dumps(km, protocol=int(how.removeprefix("pickle-"))))
    return path


