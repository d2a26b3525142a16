"""`omni convert-hubert`: fairseq-layout HuBERT checkpoints built here (fairseq's key names and config
objects) convert to a transformers HubertModel whose layer-11 features equal a hand-mapped model's;
hostile checkpoints are refused without running anything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from release_files import CONV_DIM, DIM, FFN, HEADS, LAYERS, POS_GROUPS, POS_KERNEL, fairseq_weights, write_checkpoint
from transformers import HubertConfig, HubertModel
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.errors import CheckpointError
from omni_cli.train.hubert import convert_hubert
from omni_cli.train.units import load_hubert

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
