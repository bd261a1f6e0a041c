"""Checkpoints written by the real GPTQModel 7.6.0 (tests/fixtures/gptqmodel_tiny, see its
README): our reader gives exactly GPTQModel's own dequantized weights, and the model built from
them gives GPTQModel's logits."""
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from quantbench.formats.io import open_artifact
from quantbench.models.torch_model import build_causal_lm

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gptqmodel_tiny"


def reference(name: str) -> dict[str, torch.Tensor]:
    with safe_open(str(FIXTURES / f"{name}.reference.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


@pytest.mark.parametrize("name", ["w4g32_actorder", "w4g32_asym"])
def test_gptqmodel_checkpoint_dequantizes_like_gptqmodel(name):
    art = open_artifact(FIXTURES / name)
    ref = reference(name)
    assert art.format == "gptq"
    weights = {k: v for k, v in ref.items() if not k.startswith("__")}
    assert sorted(weights) == sorted(art.quantized_names)
    for key, expect in weights.items():
        qt = art.quantized(key)
        assert torch.equal(qt.dequantize().to(expect.dtype), expect), key
    if name == "w4g32_actorder":  # act-order: a non-trivial g_idx was read and used
        assert any(art.quantized(k).g_idx is not None for k in weights)


@pytest.mark.parametrize("name", ["w4g32_actorder", "w4g32_asym"])
def test_gptqmodel_checkpoint_logits(name):
    art = open_artifact(FIXTURES / name)
    ref = reference(name)
    model = build_causal_lm(art.config, art.dequantized(), torch.float32)
    with torch.inference_mode():
        logits = model(ref["__ids__"]).logits
    expect = ref["__logits__"]  # GPTQModel's torch kernel, float16 compute
    assert (logits - expect).abs().max() < 2e-2 * expect.abs().max()
    assert torch.equal(logits.argmax(-1), expect.argmax(-1))
