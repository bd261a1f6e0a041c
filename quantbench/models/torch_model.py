"""Build a transformers causal LM from a config and a stream of (name, tensor) pairs."""
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


def _is_tied(key: str, hf_config) -> bool:
    return key == "lm_head.weight" and bool(getattr(hf_config, "tie_word_embeddings", False))


def logits_fn(model: torch.nn.Module, device: "torch.device | None" = None):
    """Adapter to the evaluator's ``input_ids -> logits`` callable; with a GPU ``device`` the
    model runs there and the logits come back to the CPU in float32."""
    if device is None or device.type == "cpu":
        def run(input_ids: torch.Tensor) -> torch.Tensor:
            return model(input_ids=input_ids, use_cache=False).logits
        return run
    model.to(device)

    def run_on_device(input_ids: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=input_ids.to(device), use_cache=False).logits
        return logits.float().cpu()

    return run_on_device
