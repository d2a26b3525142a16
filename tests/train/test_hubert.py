"""`omni convert-hubert`: fairseq-layout HuBERT checkpoints built here (fairseq's key names and config
objects) convert to a transformers HubertModel whose layer-11 features equal a hand-mapped model's;
hostile checkpoints are refused without running anything."""

from __future__ import annotations

import argparse
import contextlib
import enum
import sys
import types
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import HubertConfig, HubertModel
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.errors import CheckpointError
from omni_cli.train.hubert import conv_layers, convert_hubert
from omni_cli.train.units import load_hubert

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


def hand_mapped(sd: dict[str, torch.Tensor]) -> HubertModel:
    """A HubertModel filled module by module from the fairseq tensors (independent of the converter's name table)."""
    model = HubertModel(
        HubertConfig(
            hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
            conv_dim=[CONV_DIM] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
            conv_bias=False, feat_extract_norm="group", num_conv_pos_embeddings=POS_KERNEL,
            num_conv_pos_embedding_groups=POS_GROUPS, do_stable_layer_norm=False, layer_norm_eps=1e-5,
        )
    ).eval()
    with torch.no_grad():
        convs = model.feature_extractor.conv_layers
        for i, layer in enumerate(convs):
            layer.conv.weight.copy_(sd[f"feature_extractor.conv_layers.{i}.0.weight"])
        convs[0].layer_norm.weight.copy_(sd["feature_extractor.conv_layers.0.2.weight"])
        convs[0].layer_norm.bias.copy_(sd["feature_extractor.conv_layers.0.2.bias"])
        model.feature_projection.layer_norm.weight.copy_(sd["layer_norm.weight"])
        model.feature_projection.layer_norm.bias.copy_(sd["layer_norm.bias"])
        model.feature_projection.projection.weight.copy_(sd["post_extract_proj.weight"])
        model.feature_projection.projection.bias.copy_(sd["post_extract_proj.bias"])
        model.masked_spec_embed.copy_(sd["mask_emb"])
        pos = model.encoder.pos_conv_embed.conv
        pos.parametrizations.weight.original0.copy_(sd["encoder.pos_conv.0.weight_g"])
        pos.parametrizations.weight.original1.copy_(sd["encoder.pos_conv.0.weight_v"])
        pos.bias.copy_(sd["encoder.pos_conv.0.bias"])
        model.encoder.layer_norm.weight.copy_(sd["encoder.layer_norm.weight"])
        model.encoder.layer_norm.bias.copy_(sd["encoder.layer_norm.bias"])
        for i, layer in enumerate(model.encoder.layers):
            p = f"encoder.layers.{i}."
            for ours, theirs in ((layer.attention.k_proj, "self_attn.k_proj"), (layer.attention.v_proj, "self_attn.v_proj"),
                                 (layer.attention.q_proj, "self_attn.q_proj"), (layer.attention.out_proj, "self_attn.out_proj"),
                                 (layer.layer_norm, "self_attn_layer_norm"), (layer.feed_forward.intermediate_dense, "fc1"),
                                 (layer.feed_forward.output_dense, "fc2"), (layer.final_layer_norm, "final_layer_norm")):
                ours.weight.copy_(sd[p + theirs + ".weight"])
                ours.bias.copy_(sd[p + theirs + ".bias"])
    return model


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


def _features(model: HubertModel, layer: int = LAYERS) -> torch.Tensor:
    audio = torch.sin(torch.arange(16000) / 7.0)[None] * 0.3 + 0.01 * torch.randn(1, 16000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(audio, output_hidden_states=True).hidden_states[layer][0]


@pytest.mark.parametrize("style", ["dictconfig", "container", "namespace"])
def test_a_fairseq_checkpoint_converts_to_the_hand_mapped_model(tmp_path: Path, style: str) -> None:
    weights = fairseq_weights()
    src = write_checkpoint(tmp_path / "mhubert.pt", style, weights)
    assert "omegaconf.dictconfig" not in sys.modules  # nothing of omegaconf/fairseq exists while converting
    out = convert_hubert(src, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    converted = load_hubert(out).eval()  # strict: every weight present and used
    assert converted.config.num_hidden_layers == LAYERS and converted.config.feat_extract_norm == "group"
    torch.testing.assert_close(_features(converted), _features(hand_mapped(weights)), rtol=0, atol=1e-6)


def test_convert_hubert_cli_and_its_refusals(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "mhubert.pt", "container", fairseq_weights())
    ok = CliRunner().invoke(app, ["convert-hubert", str(src), str(tmp_path / "hf")])
    assert ok.exit_code == 0, ok.output
    assert "--hubert" in ok.stdout and (tmp_path / "hf" / "model.safetensors").is_file()
    again = CliRunner().invoke(app, ["convert-hubert", str(src), str(tmp_path / "hf")])
    assert again.exit_code == 2 and "already exists" in again.stderr
    # A weight the model has no place for, and one missing: errors naming the key.
    weights = fairseq_weights()
    weights["encoder.layers.3.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"'encoder\.layers\.3\.extra\.weight' has no place"):
        convert_hubert(write_checkpoint(tmp_path / "extra.pt", "container", weights), tmp_path / "x")
    weights = fairseq_weights()
    del weights["encoder.layers.10.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"lacks the weight for encoder\.layers\.10\.feed_forward\.output_dense\.bias"):
        convert_hubert(write_checkpoint(tmp_path / "short.pt", "container", weights), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


class _RunsCode:
    """Unpickling this calls os.system: a hostile checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_before_loading(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    src = write_checkpoint(tmp_path / "evil.pt", "dictconfig", fairseq_weights(), extra={"extra_state": {"x": _RunsCode(marker)}})
    result = CliRunner().invoke(app, ["convert-hubert", str(src), str(tmp_path / "hf")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("omni: error:") and "system, which a HuBERT checkpoint does not" in lines[0]
    assert "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "hf").exists()
