"""The one block loop every calibrated pass runs on.

:func:`capture_inputs` runs the model's own forward once per micro-batch with every decoder
layer replaced by a tap: the embeddings run, and the taps record block 0's hidden states and the
arguments the model passes each layer (its own attention mask and position embeddings, so
alternating sliding-window and global layers get theirs). :func:`walk_blocks` then, block by
block, materializes the block (weights read lazily), hands a visitor a :class:`BlockContext`,
takes the next block's inputs from it and frees the block. The quantization pipeline
(``pipeline.py``) and the EXL2 measurement (``quant/exl2/measure.py``) are visitors; the helpers
below run a block's residual branches (``x + post_norm(mixer(norm(x)))``) and capture what a
linear inside a mixer receives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from quantbench.devices import CPU
from quantbench.errors import QuantbenchError
from quantbench.finite import count_non_finite
from quantbench.lazy import torch
from quantbench.models.arch import ArchSpec, Sublayer
from quantbench.models.experts import install_routed_experts
from quantbench.models.loader import Model
from quantbench.models.torch_model import _no_init

QuantizeManyFn = Callable[[list[str], "list[torch.Tensor]", Any], "list[Any] | None"]


@dataclass
class Captured:
    """Calibration inputs of the blocks: block 0's hidden states and every block's own layer
    arguments (attention mask, position embeddings, ...), as the model's forward makes them.
    Layers of one attention kind share the same tensors; a model whose layers alternate
    sliding-window and global attention (or RoPE bases) gives each layer its own."""

    hidden: list[torch.Tensor]              # one [B, L, H] tensor per micro-batch
    layer_kwargs: list[list[dict[str, Any]]]  # per block: the kwargs of each micro-batch

    @property
    def kwargs(self) -> list[dict[str, Any]]:
        """Block 0's layer arguments (one dict per micro-batch)."""
        return self.layer_kwargs[0]

    def first(self, n: int) -> "Captured":
        """The micro-batches holding the first ``n`` windows (whole micro-batches)."""
        count = 0
        for i, h in enumerate(self.hidden):
            count += h.shape[0]
            if count >= n:
                return Captured(self.hidden[:i + 1], [kw[:i + 1] for kw in self.layer_kwargs])
        return self


def _skeleton(model: Model) -> torch.nn.Module:
    return skeleton_for(model.config, model.arch)


def skeleton_for(config: dict[str, Any], arch: ArchSpec) -> torch.nn.Module:
    """The model of ``config`` on the meta device (no memory), routed experts installed: its
    blocks are materialized one at a time (``materialize_block``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"), _no_init():
        net = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return install_routed_experts(net, arch)


def _set(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def materialize_block(skeleton: torch.nn.Module, model: Model, index: int,
                      device: torch.device = CPU) -> torch.nn.Module:
    """Decoder block ``index`` on ``device`` in float32 with its weights read lazily from disk."""
    return materialize(skeleton, f"{model.arch.block_prefix}.{index}",
                       model.weights.iter(model.block_tensor_names(index)), device)


def materialize(skeleton: torch.nn.Module, path: str,
                tensors: Iterable[tuple[str, torch.Tensor]], device: torch.device = CPU
                ) -> torch.nn.Module:
    """The skeleton's module at ``path`` made real in place on ``device``, float32, holding
    exactly ``tensors`` (full names under ``path``); ``module.to("meta")`` frees it again."""
    module = skeleton.get_submodule(path).to_empty(device=device)
    prefix = f"{path}."
    module.load_state_dict({n[len(prefix):]: t.float() for n, t in tensors}, strict=True)
    return module.eval()


class _ArgumentTap(torch.nn.Module):
    """Stands in for decoder layer ``index`` while the inputs are captured: records the hidden
    state (block 0 only) and the keyword arguments the model passes to this layer, and returns
    the hidden state unchanged (no block runs)."""

    def __init__(self, layer: torch.nn.Module, index: int, captured: Captured):
        super().__init__()
        self.index, self.captured = index, captured
        for attr in ("attention_type", "layer_idx", "is_sliding"):  # what a forward may read
            if attr in layer.__dict__:
                self.__dict__[attr] = layer.__dict__[attr]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.captured.hidden.append(hidden.detach())
        self.captured.layer_kwargs[self.index].append(
            {k: v for k, v in kwargs.items() if k != "hidden_states"})
        return hidden


def capture_inputs(model: Model, skeleton: torch.nn.Module, windows: torch.Tensor,
                   batch_size: int, device: torch.device = CPU) -> Captured:
    """Run the model's forward once per micro-batch with every decoder layer replaced by a tap:
    the embeddings (+ rotary) run, the model makes each layer's arguments (its own mask and
    position embeddings), the taps record them and block 0's input. No block is run."""
    embed = model.weights.get(f"{model.arch.embed}.weight")
    return capture_layer_inputs(model.arch, skeleton, embed, windows, batch_size, device)


def capture_layer_inputs(arch: ArchSpec, skeleton: torch.nn.Module, embed_weight: torch.Tensor,
                         windows: torch.Tensor, batch_size: int, device: torch.device = CPU,
                         hidden: "list[torch.Tensor] | None" = None) -> Captured:
    """:func:`capture_inputs` for any weights: the embedding matrix given; block 0's inputs go
    to ``hidden`` (anything with ``append``: the streamed evaluator writes them to its store)."""
    embed = skeleton.get_submodule(arch.embed).to_empty(device=device)
    if embed._non_persistent_buffers_set:  # e.g. Gemma's embedding scale √hidden: not on disk
        skeleton._init_weights(embed)
    embed.weight.data.copy_(embed_weight.float())
    del embed_weight
    base = skeleton.get_submodule(arch.base_model)  # its config: the decoder's (multimodal too)
    rotary_cls = type(skeleton.get_submodule(arch.rotary))
    _set(skeleton, arch.rotary, rotary_cls(config=base.config).to(device))
    layers = skeleton.get_submodule(arch.block_prefix)
    norm = skeleton.get_submodule(arch.final_norm)
    captured = Captured([] if hidden is None else hidden, [[] for _ in range(len(layers))])
    taps = torch.nn.ModuleList([_ArgumentTap(layer, i, captured) for i, layer in
                                enumerate(layers)])
    _set(skeleton, arch.block_prefix, taps)
    _set(skeleton, arch.final_norm, torch.nn.Identity())
    try:
        with torch.inference_mode():
            for batch in windows.split(batch_size):
                base(input_ids=batch.to(device), use_cache=False)
    finally:
        _set(skeleton, arch.block_prefix, layers)
        _set(skeleton, arch.final_norm, norm)
        embed.to("meta")  # only the blocks' inputs were needed
    return captured


def walk_blocks(model: Model, skeleton: torch.nn.Module, captured: Captured,
                visit: Callable[["BlockContext"], tuple[Any, list[torch.Tensor]]],
                device: torch.device = CPU, targets: set[str] | None = None,
                **context: Any) -> Iterator[tuple[int, Any]]:
    """The one block loop: for every block, materialize it on ``device`` (weights read lazily),
    hand ``visit`` a :class:`BlockContext` with the block's inputs and its own layer arguments,
    take the next block's inputs from what ``visit`` returns, free the block, and yield
    ``(index, visit's result)``. ``context`` fills the remaining ``BlockContext`` fields; with
    ``float_targets`` set the context also carries the float model's own block inputs
    (``reference``), which the visitor advances."""
    hidden = captured.hidden
    reference = list(hidden) if context.get("float_targets") is not None else None
    for index in range(model.num_blocks):
        check_activations(model, index, hidden)
        layer = materialize_block(skeleton, model, index, device)
        ctx = BlockContext(model, layer, index, hidden, captured.layer_kwargs[index],
                           targets if targets is not None else set(), reference=reference,
                           **context)
        result, hidden = visit(ctx)
        reference = ctx.reference
        layer.to("meta")  # release the block's memory
        yield index, result


def check_activations(model: Model, index: int, hidden: list[torch.Tensor]) -> None:
    """Refuse calibration activations entering block ``index`` that hold NaN/Inf: every
    statistic built on them (Hessians, activation scales) would be too, and the codes chosen
    from them meaningless."""
    bad = sum(count_non_finite(h) for h in hidden)
    if not bad:
        return
    allowed = sorted(model.weights.non_finite)
    source = (f"; the source's non-finite weights ({allowed[0]}"
              f"{f' and {len(allowed) - 1} more' if len(allowed) > 1 else ''}) reach it: "
              "use a data-free method (rtn, absmax, zeropoint) for this checkpoint"
              if allowed else f": block {index - 1} overflows float32; its weights are likely "
              "damaged (check their magnitudes)" if index else ": the embeddings hold them")
    raise QuantbenchError(f"calibration activations entering block {index} hold {bad} "
                          f"non-finite values (NaN/Inf){source}")


def _run(layer: torch.nn.Module, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]]
         ) -> list[torch.Tensor]:
    outs = []
    with torch.inference_mode():
        for hidden, kwargs in zip(hidden, kwargs):
            out = layer(hidden, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def call_mixer(mixer: torch.nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    with torch.inference_mode():
        out = mixer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def capture_linear_inputs(mixer: torch.nn.Module, modules: dict[str, torch.nn.Module],
                          normed: list[torch.Tensor], kwargs: list[dict[str, Any]],
                          outputs: list[torch.Tensor] | None = None
                          ) -> dict[str, list[torch.Tensor]]:
    """Run ``mixer`` over every micro-batch; return what each of ``modules`` received (and
    append the mixer's outputs to ``outputs`` when given)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = [m.register_forward_hook(lambda mod, inp, out, s=seen[n]: s.append(inp[0]))
               for n, m in modules.items()]
    try:
        for x, kw in zip(normed, kwargs):
            out = call_mixer(mixer, x, kw)
            if outputs is not None:
                outputs.append(out)
    finally:
        for h in handles:
            h.remove()
    return seen


class _InputTap(torch.nn.Module):
    """Stands in for a mixer's output linear while only its input is wanted: records the
    input and returns a zero-cost broadcast instead of computing the projection."""

    def __init__(self, linear: torch.nn.Linear, seen: list[torch.Tensor]):
        super().__init__()
        self.out_features = linear.out_features
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return x.new_zeros(()).expand(*x.shape[:-1], self.out_features)


def capture_output_input(mixer: torch.nn.Module, output: str, normed: list[torch.Tensor],
                         kwargs: list[dict[str, Any]]) -> list[torch.Tensor]:
    """What the mixer's output linear ``output`` (a path inside ``mixer``) receives on every
    micro-batch, without computing that linear (the mixer's outputs are discarded)."""
    linear = mixer.get_submodule(output)
    seen: list[torch.Tensor] = []
    _set(mixer, output, _InputTap(linear, seen))
    try:
        for x, kw in zip(normed, kwargs):
            call_mixer(mixer, x, kw)
    finally:
        _set(mixer, output, linear)
    return seen


@dataclass
class BlockContext:
    """What a method sees of one block: the materialized layer and its calibration inputs."""

    model: Model
    layer: torch.nn.Module
    index: int
    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    targets: set[str]
    quantize_many: QuantizeManyFn | None = None  # linears sharing an input in one call
    attention_values: bool = False  # value projections get per-kv-head attention Hessians
    calibration: Captured | None = None  # every block's inputs (a measurement pass reuses them)
    # GPTQ's float targets: the dampening its solve uses (None: off), and the float model's
    # inputs of this block (the visitor replaces them with the next block's)
    float_targets: float | None = None
    reference: list[torch.Tensor] | None = None
    # mixture-of-experts models (pipeline.quantize_experts): where token counts go, the
    # force-routing threshold, whether Hessians weight tokens by their routing weight
    expert_tokens: dict[int, list[int]] | None = None
    expert_min_tokens: int = 16
    router_weighted: bool = False

    @property
    def device(self) -> torch.device:
        return self.hidden[0].device if self.hidden else CPU

    @property
    def attention_kind(self) -> str:
        """This block's attention kind (``full_attention``, ``sliding_attention``)."""
        return self.model.arch.attention_kinds(self.model.hparams,
                                               self.model.num_blocks)[self.index]

    def weight_name(self, linear: str) -> str:
        return f"{self.model.arch.block_module(self.index, linear)}.weight"

    def source_weight(self, linear: str) -> torch.Tensor:
        """The layer's current weight in the checkpoint's dtype (a method may have rescaled it)."""
        name = self.weight_name(linear)
        return self.layer.get_submodule(linear).weight.detach().to(
            self.model.weights.dtype(name))

    def sublayer_kwargs(self, sub: Sublayer) -> list[dict[str, Any]]:
        return self.kwargs if sub.takes_layer_kwargs else [{} for _ in self.hidden]

    def groups_of(self, sub: Sublayer) -> list[tuple[str, ...]]:
        return [g for g in self.model.arch.sequential_groups if g[0].startswith(sub.mixer + ".")]


def residual_add(layer: torch.nn.Module, sub: Sublayer, x: list[torch.Tensor],
                 branch: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``x + post_norm(branch)`` per micro-batch (``x + branch`` when the sublayer declares no
    norm after its branch, as in llama; Gemma 2/3 and OLMo 2 norm the branch output)."""
    if sub.post_norm is None:
        return [h + b for h, b in zip(x, branch)]
    post = layer.get_submodule(sub.post_norm)
    return [h + post(b) for h, b in zip(x, branch)]
