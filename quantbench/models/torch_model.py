"""Build a transformers causal LM from a config and a stream of (name, tensor) pairs, and run it
for the evaluator as a body and a vocabulary head (``CausalLM``)."""
from __future__ import annotations

import logging
from typing import Any, Iterable

from quantbench.errors import ModelLoadError
from quantbench.lazy import torch

log = logging.getLogger(__name__)


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def build_causal_lm(
    config: dict[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """An eval-mode ``AutoModelForCausalLM`` holding exactly the given weights (cast to dtype)."""
    dtype = dtype or torch.float32
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = cfg.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **cfg)
    with _no_init():
        model = AutoModelForCausalLM.from_config(
            hf_config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    _install_experts(model, config)
    state = {name: t.to(dtype) for name, t in tensors}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not _is_tied(k, hf_config)]
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
    if result.unexpected_keys:
        log.warning("ignoring %d unexpected weights, e.g. %s", len(result.unexpected_keys),
                    result.unexpected_keys[0])
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def _install_experts(model: torch.nn.Module, config: dict[str, Any]) -> None:
    """Per-expert linears in place of transformers' fused experts (``models/experts.py``)."""
    from quantbench.models.arch import ArchSpec, arch_of
    from quantbench.models.experts import install_routed_experts

    try:
        arch: ArchSpec = arch_of(config)
    except ModelLoadError:
        return  # a model type quantbench has no layout for (trust_remote_code): as built
    install_routed_experts(model, arch)


def _is_tied(key: str, hf_config) -> bool:
    return key == "lm_head.weight" and bool(getattr(hf_config, "tie_word_embeddings", False))


class CausalLM:
    """The evaluator's view of a transformers causal LM: its body (embeddings, blocks, final
    norm: the last hidden states) and its vocabulary head, run apart so that the evaluator can
    make full-vocabulary logits a few positions at a time (a 262k-token vocabulary costs 1 MB of
    float32 per position). The head is whatever module the model holds as its output embedding
    when it runs (a runtime module swapped in by ``models/runtime.py`` included: each computes
    a row of logits from that row alone), then the config's ``final_logit_softcapping``
    (Gemma 2/3: ``cap·tanh(logits/cap)``), as transformers' forward does. With a GPU ``device``
    the model, its hidden states and its logits live there."""

    def __init__(self, model: torch.nn.Module, device: "torch.device | None" = None):
        if device is not None and device.type != "cpu":
            model.to(device)
        self.model, self.device = model, device
        # the model's own config decides, as in transformers' forward (a multimodal Gemma 3
        # caps nothing, whatever its text config says); absent: no capping
        self.softcap = model.config.to_dict().get("final_logit_softcapping")
        self.vocab_size = int(model.config.get_text_config().vocab_size)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` token ids → the body's last hidden states ``[B, T, H]``."""
        ids = input_ids if self.device is None else input_ids.to(self.device)
        return self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[..., H]`` → float32 logits ``[..., V]``, on the model's device."""
        logits = self.model.get_output_embeddings()(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The whole batch's logits ``[B, T, V]`` at once, float32 on the CPU (tests and small
        vocabularies; the evaluator uses ``hidden`` and ``head``)."""
        return self.head(self.hidden(input_ids)).cpu()


def logits_fn(model: torch.nn.Module, device: "torch.device | None" = None) -> CausalLM:
    """Adapter to the evaluator's model callable (see ``CausalLM``); with a GPU ``device`` the
    model runs there."""
    return CausalLM(model, device)
