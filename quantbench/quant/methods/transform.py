"""Transforms: a method that changes the float block, then lets an inner method pick the codes.

AWQ's scale search is one (``--method awq --then gptq``); rotations or SmoothQuant slot in the
same way: a ``Transform`` subclass implements ``apply_block`` (calibrated, on the float block)
and ``apply_tensors`` (data-free, on a block's named tensors), and everything else — the
statistic, the codes, the GGUF type plan, the side files — is the inner method's, through the
``Method`` contract. ``then`` names the inner method; its options are given flat beside the
transform's own (``qb.quantize(model, method="awq", then="gptq", act_order=True)``) and held in
``options.inner``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

from quantbench.config import MethodOptions, QuantizeConfig
from quantbench.errors import ConfigError
from quantbench.lazy import torch
from quantbench.options import internal, option, option_fields
from quantbench.quant.methods.base import Method
from quantbench.tensor import QuantizedTensor


@dataclass(frozen=True)
class TransformOptions(MethodOptions):
    """A transform's options: its own fields, ``then`` (the inner method) and ``inner`` (the
    inner method's options, built from ``inner_defaults[then]`` when not given). Fields both
    share (the calibration windows, the device) are the transform's, copied into ``inner``."""

    then: str = option("rtn", choices="inner_methods", help=(
        "The method that picks the codes after the transform; every option of that method "
        "applies (under awq, gptq defaults to --no-act-order, --static-groups, "
        "--input-values)."))
    inner: MethodOptions | None = internal()

    inner_methods: ClassVar[tuple[str, ...]] = ("rtn",)
    # the inner method's defaults under this transform, where they differ from its own
    inner_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.then not in self.inner_methods:
            raise ConfigError(f"--then must be {' or '.join(self.inner_methods)}, got "
                              f"{self.then!r}")
        inner = self.inner
        if inner is None or isinstance(inner, Mapping):
            inner = _options_cls(self.then)(**{**self.inner_defaults.get(self.then, {}),
                                               **(inner or {})})
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(inner)
                  if f.name in self.own_names()}
        object.__setattr__(self, "inner", dataclasses.replace(inner, **shared))

    @classmethod
    def own_names(cls) -> set[str]:
        return {f.name for f in option_fields(cls)}

    @classmethod
    def from_flat(cls, **given: Any) -> "TransformOptions":
        """Split flat keywords: the transform's own, the rest the inner method's."""
        own = {k: v for k, v in given.items() if k in cls.own_names()}
        rest = {k: v for k, v in given.items() if k not in own}
        then = own.get("then", cls.then)
        return cls(**own, inner={**cls.inner_defaults.get(then, {}), **rest})

    def to_dict(self) -> dict[str, Any]:
        """Flat, as given: the transform's own fields, then the inner method's others."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "inner"}
        out.update({k: v for k, v in self.inner.to_dict().items() if k not in out})
        return out

    def sweep(self):
        """The inner method's GPTQ sweep settings (None for RTN)."""
        return self.inner.sweep()


def _options_cls(method: str) -> type[MethodOptions]:
    from quantbench.registry import get_method

    return get_method(method).options_cls


class Transform(Method):
    """A method around an inner one (``self.inner``, named by ``options.then``): it runs
    ``apply_block``/``apply_tensors`` on the float block and delegates every other hook."""

    options_cls: ClassVar[type[TransformOptions]] = TransformOptions

    def __init__(self, config: QuantizeConfig):
        from quantbench.registry import get_method

        super().__init__(config)
        o = config.options
        self.inner: Method = get_method(o.then)(dataclasses.replace(
            config, method=o.then, options=o.inner))

    # -- options: the transform's own plus those of the inner method ``then`` names ---------
    @classmethod
    def _then(cls, given: Mapping[str, Any] | None) -> str:
        return (given or {}).get("then") or cls.options_cls.then

    @classmethod
    def option_names(cls, given: Mapping[str, Any] | None = None) -> set[str]:
        from quantbench.registry import get_method

        then = cls._then(given)
        inner = get_method(then).option_names() if then in cls.inner_methods else set()
        return cls.options_cls.own_names() | inner

    @classmethod
    def check_options(cls, given: Mapping[str, Any],
                      flag: Callable[[str], str] = str) -> None:
        from quantbench.registry import get_method

        then = cls._then(given)
        if then not in cls.inner_methods:
            cls.options_cls(then=then)  # the one-line refusal naming the choices
        unknown = sorted(set(given) - cls.option_names(given))
        if not unknown:
            return
        from quantbench.registry import did_you_mean

        owners = [m for m in cls.inner_methods if unknown[0] in get_method(m).option_names()]
        near = did_you_mean(unknown[0], cls.option_names(given), flag).strip()
        hint = f"; it is {owners[0]}'s: pass {flag('then')} {owners[0]}" if owners else \
            (f"; {near}" if near else "")
        raise ConfigError(f"method {cls.name} with {flag('then')} {then} takes no "
                          f"{flag(unknown[0])} option{hint}")

    @classmethod
    def build_options(cls, **given: Any) -> MethodOptions:
        cls.check_options(given)
        return cls.options_cls.from_flat(**given)

    # -- the transform's own work -----------------------------------------------------------
    def apply_block(self, ctx) -> None:
        """Calibrated: change the float block in place (``ctx.layer``) before quantization."""

    def apply_tensors(self, model, index: int, tensors: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        """Data-free: the same change on one block's named tensors."""
        return tensors

    def own_side_files(self, directory: Path) -> list[str]:
        """The transform's own files beside the weights (its search result)."""
        return []

    def own_plan_costs(self, model, shapes: dict[str, tuple[int, int]], hidden: int,
                       tokens: int, fwd: float) -> dict[str, float]:
        return {}

    # -- the contract: the transform's work first, the inner method's for the rest ----------
    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.inner.needs_calibration

    @property
    def statistic(self) -> str | None:  # type: ignore[override]
        return self.inner.statistic

    @property
    def device_capable(self) -> bool:  # type: ignore[override]
        return self.inner.device_capable

    @property
    def attention_values(self) -> bool:  # type: ignore[override]
        return self.inner.attention_values

    @property
    def has_imatrix(self) -> bool:  # type: ignore[override]
        return self.inner.has_imatrix

    @property
    def float_targets(self) -> float | None:  # type: ignore[override]
        return self.inner.float_targets

    def prepare(self, model, targets: list[str]) -> None:
        self.inner.prepare(model, targets)

    def tensor_types(self) -> dict[str, str]:
        return self.inner.tensor_types()

    def grid_for(self, name: str):
        return self.inner.grid_for(name)

    def plan_costs(self, model, shapes: dict[str, tuple[int, int]], hidden: int, tokens: int,
                   fwd: float) -> dict[str, float]:
        parts = self.inner.plan_costs(model, shapes, hidden, tokens, fwd)
        for key, value in self.own_plan_costs(model, shapes, hidden, tokens, fwd).items():
            parts[key] = parts.get(key, 0) + value
        return parts

    def prepare_block(self, ctx) -> None:
        self.apply_block(ctx)
        self.inner.prepare_block(ctx)

    def transform_block(self, model, index: int, tensors: dict[str, torch.Tensor]
                        ) -> dict[str, torch.Tensor]:
        return self.inner.transform_block(model, index, self.apply_tensors(model, index,
                                                                           tensors))

    def quantize_weight(self, name: str, weight: torch.Tensor) -> QuantizedTensor:
        return self.inner.quantize_weight(name, weight)

    def quantize_with_stats(self, name: str, weight: torch.Tensor, stat: Any) -> QuantizedTensor:
        return self.inner.quantize_with_stats(name, weight, stat)

    def quantize_many_with_stats(self, names: list[str], weights: list[torch.Tensor],
                                 stat: Any) -> list[QuantizedTensor] | None:
        return self.inner.quantize_many_with_stats(names, weights, stat)

    def gguf_metadata(self) -> list[tuple[str, Any, str]]:
        return self.inner.gguf_metadata()

    def side_files(self, directory: Path) -> list[str]:
        return self.own_side_files(directory) + self.inner.side_files(directory)
