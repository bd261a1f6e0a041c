"""``awq``: activation-aware scaling and clipping on the shared calibration layer, a transform
(``methods/transform.py``) around the method that then picks the codes: round-to-nearest
(``then="rtn"``, default) or GPTQ with all its options (``then="gptq"``).

Per block and residual branch (``ArchSpec.sublayers``): one float pass captures what every
linear receives and the branch output; for each ``scale_folding`` pair (llama family:
input_layernorm→q/k/v, v→o when shapes allow, post_attention_layernorm→gate/up, up→down) the
scales are searched against the output of the module that consumes them (the whole attention or
MLP for a norm pair, the single linear for a linear pair) and folded in; each weight's group
ranges are then clipped (q/k exempt, as in AWQ). The search result is data: written as
``awq_search.safetensors`` and re-applied with ``search_file=`` without calibration.

On a GGUF type (``--type Q4_K_M``) the search and the clips run on the integer grid nearest to
the mixture's main block type (:func:`proxy_grid`: Q4_K → 4-bit, groups of 32, with a minimum),
the scales fold into the float norms and linears as above, and each tensor is then quantized to
its own ggml type: the codec's reference search (``then="rtn"``) or GPTQ onto the fitted blocks
(``then="gptq"``, as ``--method gptq --type``). The search and folding code is in
``awq_search.py``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

from safetensors import safe_open

from quantbench.config import CalibrationOptions, GridConfig, QuantizeConfig
from quantbench.errors import ConfigError
from quantbench.lazy import torch
from quantbench.options import option
from quantbench.quant.grids.gguf import PROXY_GRIDS, proxy_grid  # noqa: F401  (their home now)
from quantbench.quant.methods.awq_search import (CLIP_EXEMPT, apply_saved,  # noqa: F401
                                                 apply_saved_tensors, awq_block)
from quantbench.quant.methods.transform import Transform, TransformOptions
from quantbench.ranges import Range
from quantbench.registry import register_method

log = logging.getLogger(__name__)

SEARCH_FILE = "awq_search.safetensors"

# GPTQ's defaults under AWQ, where they differ from ``--method gptq``'s: the combination
# measured when AWQ + GPTQ was added (act-order off, static groups, no attention-weighted
# values), so its outputs keep their bytes; every one can be set (``--then gptq --act-order``).
GPTQ_UNDER_AWQ = {"damp_percent": 0.01, "block_size": 128, "act_order": False,
                  "static_groups": True, "scale_search": True, "attention_values": False}


@dataclass(frozen=True)
class AWQOptions(CalibrationOptions, TransformOptions):
    n_grid: int = option(20, flag="--awq-grid", allowed=Range(1, integer=True),
                         help="Grid points for the scale exponent.")
    exhaustive: bool = option(False, flag="--exhaustive-search", switch=True, help=(
        "Evaluate every grid point (default: coarse grid + refinement)."))
    duo_scaling: bool = option(True, cli=False, help="Scales from activation and weight "
                               "magnitudes (AWQ's duo scaling), not activations alone.")
    clip: bool = option(True, help="Search weight clipping.")
    clip_grid: int = option(20, cli=False, allowed=Range(1, integer=True),
                            help="Steps of the clipping search.")
    max_shrink: float = option(0.5, cli=False, allowed=Range(0, 1, high_open=True),
                               help="Largest fraction the clipping search shrinks a range by.")
    clip_tokens: int = option(512, cli=False, allowed=Range(1, integer=True),
                              help="Tokens the clipping search runs on.")
    # 8 windows: 4096 tokens at the default --calib-len
    search_samples: int = option(8, allowed=Range(1, integer=True),
                                 help="Windows the scale search runs its forwards on.")
    search_file: str | None = option(None, help="Re-apply a saved awq_search.safetensors "
                                     "instead of searching.")
    calib_samples: int = 32

    inner_methods: ClassVar[tuple[str, ...]] = ("rtn", "gptq")
    inner_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {"gptq": GPTQ_UNDER_AWQ}


@register_method("awq")
class AWQ(Transform):
    description = "AWQ: activation-aware scales folded into norms/linears + clipping, then RTN or GPTQ"
    options_cls = AWQOptions
    inner_methods = AWQOptions.inner_methods
    symmetric = False
    gguf_capable = True    # searched on proxy_grid, each tensor then on its ggml type

    def __init__(self, config: QuantizeConfig):
        super().__init__(config)
        self.search: dict[str, torch.Tensor] = {}
        self.saved = _load_search(config.options.search_file)

    def search_grid(self, name: str) -> GridConfig | None:
        """The grid the searches quantize weight ``name`` with: the run's integer grid, or on
        GGUF the proxy of the ggml type llama.cpp's rules give this tensor (on SmolLM2's
        576-wide rows Q4_K_M's Q4_K falls back to Q5_0: its proxy is 5-bit)."""
        planned = self.inner.tensor_types()
        if planned and name not in planned:
            return None
        return self.inner.grid_for(name).search_proxy()

    @classmethod
    def check(cls, config: QuantizeConfig) -> None:
        if config.grid.search_proxy() is None:
            raise ConfigError(f"awq searches per-group or per-channel scales, which "
                              f"{config.grid.describe()} has none of; pass --group-size 128 "
                              "(or -1 for per channel), or a quantized GGUF type such as "
                              "--type Q4_K_M")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.saved is None or self.inner.needs_calibration

    # -- the transform: search and fold (calibrated), or re-apply a saved search -------------
    def apply_block(self, ctx) -> None:
        if self.saved is not None:
            apply_saved(ctx.layer, ctx.model.arch, ctx.index, self.saved, self.search_grid,
                        ctx.model.config)
        else:
            self.search.update(awq_block(ctx, self.config, self.search_grid))

    def apply_tensors(self, model, index: int, tensors: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        return apply_saved_tensors(model.arch, index, tensors, self.saved, self.search_grid,
                                   model.config)

    def prepare(self, model, targets: list[str]) -> None:
        super().prepare(model, targets)
        if self.saved is not None:
            _check_search_fits(self.saved, model, self.config.options.search_file)

    def own_side_files(self, directory: Path) -> list[str]:
        """The search result beside the weights (``--search-file`` re-applies it to this or
        another grid or GGUF type without calibration)."""
        from safetensors.torch import save_file

        if not self.search:
            return []
        save_file(dict(self.search), str(Path(directory) / SEARCH_FILE), {"format": "pt"})
        return [SEARCH_FILE]

    def own_plan_costs(self, model, shapes: dict[str, tuple[int, int]], hidden: int,
                       tokens: int, fwd: float) -> dict[str, float]:
        """Two more block forwards (capture, branch outputs), the scale search's candidate
        forwards on the search windows, the clip search's candidate matmuls."""
        from quantbench.quant.awq import expected_candidates

        o, n_blocks = self.config.options, model.num_blocks
        search_tokens = min(tokens, o.search_samples * o.calib_len)
        candidates = expected_candidates(o.n_grid, o.exhaustive)
        parts = {"forwards": 2 * fwd * n_blocks,
                 "scale search": candidates * fwd * search_tokens / max(tokens, 1) * n_blocks}
        if o.clip:
            shrink = max(1, int(o.max_shrink * o.clip_grid))
            parts["clip search"] = sum(2 * o.clip_tokens * i * out * (shrink + 1)
                                       for out, i in shapes.values()) * n_blocks / 1e9
        return parts


def _load_search(path: str | None) -> dict[str, torch.Tensor] | None:
    if path is None:
        return None
    if Path(path).is_dir():
        raise ConfigError(f"--search-file {path} is a directory; pass the {SEARCH_FILE} an "
                          "earlier awq run wrote")
    try:
        with safe_open(path, framework="pt") as fh:
            saved = {k: fh.get_tensor(k) for k in fh.keys()}
    except (OSError, Exception) as exc:  # safetensors raises its own error type
        raise ConfigError(f"cannot read AWQ search file {path} ({exc}); pass the "
                          f"{SEARCH_FILE} an earlier awq run wrote") from exc
    foreign = [k for k in saved if not k.endswith(_SEARCH_KINDS)]
    if foreign or not saved:
        what = f"tensor {foreign[0]!r} is no AWQ scale or clip" if foreign else "it is empty"
        raise ConfigError(f"{path} is not an AWQ search ({what}); pass the {SEARCH_FILE} an "
                          "earlier awq run wrote")
    return saved


_SEARCH_KINDS = (".awq_scales", ".awq_clip")


def _check_search_fits(saved: dict[str, torch.Tensor], model, path: str) -> None:
    """Every saved scale and clip belongs to a weight of this model, one value (row) per
    output row of it; a search of another model is refused, not folded in wrongly."""
    for key, tensor in saved.items():
        weight = _stored_weight(model, key.rsplit(".", 1)[0])
        if weight not in model.weights:
            raise ConfigError(f"{path} holds {key}, but this model has no {weight}: it is the "
                              "search of another model; search again (drop --search-file)")
        part = model.arch.stored(_relative(model.arch, key.rsplit(".", 1)[0]),
                                 model.config)[1]
        rows = model.weights.shape(weight)[0] if part is None else part.stop - part.start
        if tensor.shape[0] != rows:
            raise ConfigError(f"{path}: {key} has {tensor.shape[0]} rows, {weight} has {rows}: "
                              "it is the search of another model; search again (drop "
                              "--search-file)")


def _relative(arch, module: str) -> str:
    index = arch.block_of(module + ".weight")
    return module if index is None else module[len(f"{arch.block_prefix}.{index}."):]


def _stored_weight(model, module: str) -> str:
    """The weight holding ``module``'s rows: its own, or its fused linear's (Phi-3's v_proj
    scales fold into qkv_proj's value rows)."""
    relative = _relative(model.arch, module)
    stored = model.arch.stored(relative, model.config)[0]
    return module[: len(module) - len(relative)] + stored + ".weight"
