"""``awq``: activation-aware scaling and clipping on the shared calibration layer, then
round-to-nearest (default) or GPTQ (``then="gptq"``) on the rescaled block.

Per block and residual branch (``ArchSpec.sublayers``): one float pass captures what every
linear receives and the branch output; for each ``scale_folding`` pair (llama family:
input_layernorm→q/k/v, v→o when shapes allow, post_attention_layernorm→gate/up, up→down) the
scales are searched against the output of the module that consumes them (the whole attention or
MLP for a norm pair, the single linear for a linear pair) and folded in; each weight's group
ranges are then clipped (q/k exempt, as in AWQ). The search result is data: written as
``awq_search.safetensors`` and re-applied with ``search_file=`` without calibration.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from safetensors import safe_open

from quantbench.config import CalibrationOptions, QuantizeConfig
from quantbench.errors import ConfigError
from quantbench.quant.awq import apply_clip, fold_scales, search_clip, search_scales
from quantbench.quant.gptq import GPTQParams, gptq_quantize
from quantbench.quant.methods.base import Method
from quantbench.quant.methods.rtn import rtn_quantize
from quantbench.registry import register_method
from quantbench.tensor import QuantizedTensor

log = logging.getLogger(__name__)

SEARCH_FILE = "awq_search.safetensors"
CLIP_EXEMPT = ("q_proj", "k_proj")  # their errors feed a dot product, AWQ leaves them unclipped


@dataclass(frozen=True)
class AWQOptions(CalibrationOptions):
    n_grid: int = 20
    exhaustive: bool = False      # every grid point (AWQ) instead of coarse + refine
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    search_samples: int = 8       # windows the scale search runs its forwards on (4096 tokens)
    then: str = "rtn"             # "rtn" or "gptq"
    search_file: str | None = None
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = True
    calib_samples: int = 32


@register_method("awq")
class AWQ(Method):
    description = "AWQ: activation-aware scales folded into norms/linears + clipping, then RTN or GPTQ"
    options_cls = AWQOptions
    symmetric = False

    def __init__(self, config: QuantizeConfig):
        super().__init__(config)
        self.search: dict[str, torch.Tensor] = {}
        self.saved = _load_search(config.options.search_file)

    @classmethod
    def check(cls, config: QuantizeConfig) -> None:
        o = config.options
        if o.then not in ("rtn", "gptq"):
            raise ConfigError(f"--then must be rtn or gptq, got {o.then!r}")
        if config.grid.granularity == "tensor":
            raise ConfigError("awq needs per-group or per-channel scales; pass --group-size 128 "
                              "(or -1 for per channel)")
        if o.n_grid < 1 or o.clip_grid < 1 or not 0 <= o.max_shrink < 1:
            raise ConfigError("awq needs --awq-grid >= 1 and a max shrink in [0, 1)")
        if o.act_order and o.then != "gptq":
            raise ConfigError("act-order only applies with --then gptq")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.saved is None or self.config.options.then == "gptq"

    @property
    def statistic(self) -> str | None:
        return "hessian" if self.config.options.then == "gptq" else None

    # -- the pipeline calls these --------------------------------------------------------------
    def prepare_block(self, ctx) -> None:
        if self.saved is not None:
            _apply_saved(ctx.layer, ctx.model.arch, ctx.index, self.saved, self.config.grid)
        else:
            self.search.update(awq_block(ctx, self.config))

    def quantize_with_stats(self, name: str, weight: torch.Tensor,
                            hessian: torch.Tensor | None) -> QuantizedTensor:
        scale_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) \
            else torch.float16
        if hessian is None:
            return rtn_quantize(weight, self.config.grid, scale_dtype)
        o = self.config.options
        params = GPTQParams(o.damp_percent, o.block_size, o.act_order, o.static_groups)
        qt, _ = gptq_quantize(weight, hessian, self.config.grid, params, scale_dtype)
        return qt

    # -- data-free re-application of a saved search (then=rtn) --------------------------------
    def transform_block(self, model, index: int, tensors: dict[str, torch.Tensor]
                        ) -> dict[str, torch.Tensor]:
        return apply_saved_tensors(model.arch, index, tensors, self.saved, self.config.grid)

    def quantize_weight(self, name: str, weight: torch.Tensor) -> QuantizedTensor:
        return self.quantize_with_stats(name, weight, None)

    def outputs(self) -> dict[str, dict[str, torch.Tensor]]:
        return {SEARCH_FILE: dict(self.search)} if self.search else {}


def _load_search(path: str | None) -> dict[str, torch.Tensor] | None:
    if path is None:
        return None
    try:
        with safe_open(path, framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except (OSError, Exception) as exc:  # safetensors raises its own error type
        raise ConfigError(f"cannot read AWQ search file {path} ({exc}); pass the "
                          f"{SEARCH_FILE} an earlier awq run wrote") from exc


def _subset(items: list, windows: list[torch.Tensor], n: int) -> list:
    """The first micro-batches covering ``n`` windows."""
    out, seen = [], 0
    for item, w in zip(items, windows):
        if seen >= n:
            break
        out.append(item)
        seen += w.shape[0]
    return out


def awq_block(ctx, config: QuantizeConfig) -> dict[str, torch.Tensor]:
    """Search and apply AWQ scales and clips to one float block in place; return the search
    result as named tensors (``<prev>.awq_scales``, ``<linear>.awq_clip``)."""
    from quantbench.calibration.pipeline import capture_linear_inputs

    o, grid, arch, layer = config.options, config.grid, ctx.model.arch, ctx.layer
    if not arch.sublayers:
        raise ConfigError(f"awq needs the block structure (sublayers) of {arch.family}; "
                          "use --method gptq")
    prefix = f"{arch.block_prefix}.{ctx.index}."
    result: dict[str, torch.Tensor] = {}
    x = ctx.hidden
    for sub in arch.sublayers:
        norm, mixer = layer.get_submodule(sub.norm), layer.get_submodule(sub.mixer)
        kwargs = ctx.sublayer_kwargs(sub)
        with torch.inference_mode():
            normed = [norm(h) for h in x]
        groups = ctx.groups_of(sub)
        inner = {g[0]: layer.get_submodule(g[0]) for g in groups if g[0] not in sub.inputs}
        outs: list[torch.Tensor] = []
        feats = capture_linear_inputs(mixer, inner, normed, kwargs, outputs=outs)
        for group in groups:
            if group[0] in sub.inputs:
                feats[group[0]] = normed
            for lin in group[1:]:
                feats[lin] = feats[group[0]]
        for prev, linears in arch.scale_folding:
            if not linears[0].startswith(sub.mixer + "."):
                continue
            if not any(ctx.weight_name(lin) in ctx.targets for lin in linears):
                continue
            prev_mod = layer.get_submodule(prev)
            mods = [layer.get_submodule(lin) for lin in linears]
            if prev_mod.weight.shape[0] != mods[0].in_features:
                log.debug("block %d: %s → %s shapes differ, no scales", ctx.index, prev, linears)
                continue
            xs = feats[linears[0]]
            x_mean = torch.cat([f.reshape(-1, f.shape[-1]) for f in xs]).abs().mean(dim=0)
            if set(linears) <= set(sub.inputs):   # inspect the whole branch
                n_sub = _subset(normed, x, o.search_samples)
                k_sub = kwargs[: len(n_sub)]
                reference = torch.cat(outs[: len(n_sub)])
                inspect = _branch_inspector(mixer, mods, n_sub, k_sub)
            else:                                 # inspect the single consuming linear
                x_sub = torch.cat(_subset(xs, x, o.search_samples))
                with torch.inference_mode():
                    reference = mods[0](x_sub)
                inspect = _linear_inspector(mods[0], x_sub)
            found = search_scales(x_mean, [m.weight.data for m in mods], grid, inspect,
                                  reference, o.n_grid, o.duo_scaling, o.exhaustive)
            with torch.inference_mode():
                fold_scales(prev_mod, mods, found.scales)
            result[f"{prefix}{prev}.awq_scales"] = found.scales.float().clone()
            scaled = [f / found.scales for f in xs]
            for lin in linears:
                feats[lin] = scaled
        if o.clip:
            for group in groups:
                for lin in group:
                    if lin.endswith(CLIP_EXEMPT) or ctx.weight_name(lin) not in ctx.targets:
                        continue
                    module = layer.get_submodule(lin)
                    flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats[lin]])
                    step = max(1, flat.shape[0] // o.clip_tokens)
                    max_val = search_clip(module.weight.data, flat[::step][: o.clip_tokens], grid,
                                          o.clip_grid, o.max_shrink)
                    with torch.inference_mode():
                        module.weight.data.copy_(apply_clip(module.weight.data, max_val, grid))
                    result[f"{prefix}{lin}.awq_clip"] = max_val.float().clone()
        x = [h + out for h, out in zip(x, outs)]   # the float branch output (scales keep it)
    return result


def _branch_inspector(mixer, mods, normed, kwargs):
    from quantbench.calibration.pipeline import call_mixer

    def inspect(trial: list[torch.Tensor]) -> torch.Tensor:
        saved = [m.weight.data.clone() for m in mods]
        try:
            for m, w in zip(mods, trial):
                m.weight.data.copy_(w)
            return torch.cat([call_mixer(mixer, n, kw) for n, kw in zip(normed, kwargs)])
        finally:
            for m, w in zip(mods, saved):
                m.weight.data.copy_(w)
    return inspect


def _linear_inspector(module, x):
    def inspect(trial: list[torch.Tensor]) -> torch.Tensor:
        out = x @ trial[0].t()
        return out + module.bias if getattr(module, "bias", None) is not None else out
    return inspect


def _apply_saved(layer, arch, index: int, saved: dict[str, torch.Tensor], grid) -> None:
    prefix = f"{arch.block_prefix}.{index}."
    state = {prefix + k: v for k, v in layer.state_dict().items()}
    new = apply_saved_tensors(arch, index, state, saved, grid)
    with torch.inference_mode():
        for name, tensor in new.items():
            target = layer.get_parameter(name[len(prefix):])
            target.data.copy_(tensor.to(target.dtype))


def apply_saved_tensors(arch, index: int, tensors: dict[str, torch.Tensor],
                        saved: dict[str, torch.Tensor] | None, grid) -> dict[str, torch.Tensor]:
    """Re-apply a saved AWQ search (scales, then clips) to one block's named tensors."""
    if saved is None:
        return tensors
    prefix = f"{arch.block_prefix}.{index}."
    work: dict[str, torch.Tensor] = {}

    def get(key: str) -> torch.Tensor:
        if key not in work:
            work[key] = tensors[key].float()
        return work[key]

    for prev, linears in arch.scale_folding:
        s = saved.get(f"{prefix}{prev}.awq_scales")
        if s is None:
            continue
        key = f"{prefix}{prev}.weight"
        w = get(key)
        work[key] = w / s if w.dim() == 1 else w / s.view(-1, 1)
        bias = f"{prefix}{prev}.bias"
        if bias in tensors:
            work[bias] = get(bias) / s
        for lin in linears:
            k = f"{prefix}{lin}.weight"
            work[k] = get(k) * s.view(1, -1)
    for lin in arch.linears:
        clip = saved.get(f"{prefix}{lin}.awq_clip")
        if clip is not None:
            k = f"{prefix}{lin}.weight"
            work[k] = apply_clip(get(k), clip, grid)
    return {**tensors, **{k: v.to(tensors[k].dtype) for k, v in work.items()}}
