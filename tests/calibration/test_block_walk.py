"""The one block loop: every block's own layer arguments (alternating sliding-window and global
attention), and residual branches with a norm after the branch (Gemma 2/3, OLMo 2)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from quantbench.calibration.pipeline import (BlockContext, _run, _skeleton, capture_inputs,
                                             quantize_block_staged, walk_blocks)
from quantbench.models import arch as arch_module
from quantbench.models.arch import LLAMA, Sublayer
from quantbench.models.loader import load_model
from tests.conftest import TINY_VOCAB, make_tokenizer

WINDOWS = torch.randint(0, TINY_VOCAB, (3, 40), generator=torch.Generator().manual_seed(0))


def _reference_states(path) -> tuple[torch.Tensor, ...]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        return hf(WINDOWS, output_hidden_states=True).hidden_states


def _float_walk(model, visit) -> list[torch.Tensor]:
    """Every block's float output over WINDOWS, walked by the pipeline's block loop."""
    skeleton = _skeleton(model)
    captured = capture_inputs(model, skeleton, WINDOWS, batch_size=2)
    return [torch.cat(out) for _, out in walk_blocks(model, skeleton, captured, visit)]


def _whole(ctx: BlockContext):
    out = _run(ctx.layer, ctx.hidden, ctx.kwargs)
    return out, out


@pytest.fixture(scope="module")
def alternating_qwen2(tmp_path_factory):
    """Qwen2 whose layers alternate sliding-window (8 tokens) and global attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, use_sliding_window=True, sliding_window=8,
                      max_window_layers=0,
                      layer_types=["sliding_attention", "full_attention"] * 2)
    path = tmp_path_factory.mktemp("qwen2-alt") / "model"
    Qwen2ForCausalLM(cfg).save_pretrained(str(path))
    make_tokenizer(path)
    return path


def test_each_block_gets_its_own_layer_arguments(alternating_qwen2):
    model = load_model(alternating_qwen2)
    states = _reference_states(alternating_qwen2)
    kinds = []
    outs = _float_walk(model, lambda ctx: (kinds.append(ctx.attention_kind), _whole(ctx))[1])
    assert kinds == ["sliding_attention", "full_attention"] * 2
    for index, out in enumerate(outs[:-1]):  # the last hidden state is after the final norm
        assert torch.allclose(out, states[index + 1], atol=1e-5), f"block {index}"

    # block 0's (sliding) arguments reused everywhere would be wrong from the first global block
    skeleton = _skeleton(model)
    captured = capture_inputs(model, skeleton, WINDOWS, batch_size=2)
    captured.layer_kwargs = [captured.layer_kwargs[0]] * len(captured.layer_kwargs)
    stale = [torch.cat(o) for _, o in walk_blocks(model, skeleton, captured, _whole)]
    assert not torch.allclose(stale[1], states[2], atol=1e-3)


GEMMA2_TEST_ARCH = dataclasses.replace(
    LLAMA, family="gemma2-test", model_types=("gemma2",),
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
           "post_feedforward_layernorm"),
    sublayers=(
        Sublayer("input_layernorm", "self_attn",
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "self_attn.o_proj", takes_layer_kwargs=True, values="self_attn.v_proj",
                 post_norm="post_attention_layernorm"),
        Sublayer("pre_feedforward_layernorm", "mlp", ("mlp.gate_proj", "mlp.up_proj"),
                 "mlp.down_proj", post_norm="post_feedforward_layernorm"),
    ))


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory):
    """Gemma 2 block: norms after both branches, sliding/global layers, scaled embeddings."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=128, sliding_window=8)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # norms away from their zero init, so a skipped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("gemma2") / "model"
    model.save_pretrained(str(path))
    make_tokenizer(path)
    return path


def test_staged_blocks_apply_post_branch_norms(tiny_gemma2, monkeypatch):
    monkeypatch.setattr(arch_module, "ARCHITECTURES", (*arch_module.ARCHITECTURES,
                                                       GEMMA2_TEST_ARCH))
    model = load_model(tiny_gemma2)
    states = _reference_states(tiny_gemma2)

    def staged(ctx: BlockContext):
        _, out = quantize_block_staged(ctx, None, lambda *a: None)
        return out, out

    outs = _float_walk(model, staged)
    for index, out in enumerate(outs[:-1]):
        assert torch.allclose(out, states[index + 1], atol=1e-4), f"block {index}"
    # the same branches without their post norms do not reproduce the model
    plain = dataclasses.replace(GEMMA2_TEST_ARCH, sublayers=tuple(
        dataclasses.replace(s, post_norm=None) for s in GEMMA2_TEST_ARCH.sublayers))
    monkeypatch.setattr(model, "arch", plain)
    assert not torch.allclose(_float_walk(model, staged)[0], states[1], atol=1e-3)
