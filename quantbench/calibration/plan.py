"""A dry estimate of a quantization run's time and peak memory (``convert --plan``).

Nothing is loaded but tensor headers: the cost model counts the floating-point work the
pipeline will do (block forwards over the calibration tokens, statistics, the per-layer
solves or searches) and divides by this machine's measured matrix-multiply throughput; memory
is one float32 block, the calibration activations the pipeline keeps, and the largest
statistic, plus the interpreter's own footprint. With ``--device cuda`` the throughput is
the GPU's, plus GPTQ's launch-bound column sweep; memory is then the host's.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field

from quantbench.devices import CPU, resolve_device
from quantbench.errors import ConfigError
from quantbench.lazy import torch
from quantbench.models.loader import Model
from quantbench.registry import get_method

RUNTIME_BASE_BYTES = 600 * 2**20   # Python + torch + transformers, measured
EFFICIENCY = 0.45                  # real forwards reach about this share of a square matmul


GPU_COLUMN_SECONDS = 8e-5         # GPTQ's column sweep on a GPU is launch-bound: measured on H100

# A run estimated longer than this prints its plan before the first block (convert, compare,
# recipes and the Python API alike), with a smaller calibration and its estimate.
LONG_RUN_SECONDS = 180
# The smaller calibration offered (windows × tokens): an eighth of the default 128 × 512.
SMALLER_CALIBRATION = (32, 256)


@functools.lru_cache(maxsize=None)  # once per process and device: the machine does not change
def machine_gflops(device: torch.device = CPU) -> float:
    return measure_gflops(device=device)


def measure_gflops(n: int = 1024, repeats: int = 3, device: torch.device = CPU) -> float:
    if device.type == "cuda":
        n, repeats = 4096, 10
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Plan:
    method: str
    blocks: int
    tokens: int
    gflop: float
    machine_gflops: float
    peak_bytes: int
    parts: dict[str, float] = field(default_factory=dict)   # GFLOP per stage
    device: str = "cpu"
    overhead_seconds: float = 0.0  # work that is not bound by arithmetic (GPU kernel launches)

    @property
    def seconds(self) -> float:
        return self.gflop / (self.machine_gflops * EFFICIENCY) + self.overhead_seconds

    def to_dict(self) -> dict:
        return {"method": self.method, "blocks": self.blocks, "calibration_tokens": self.tokens,
                "gflop": round(self.gflop, 1), "machine_gflops": round(self.machine_gflops, 1),
                "estimated_seconds": round(self.seconds, 1), "peak_bytes": self.peak_bytes,
                "device": self.device,
                "parts_gflop": {k: round(v, 1) for k, v in self.parts.items()}}


def _block_shapes(model: Model) -> dict[str, tuple[int, int]]:
    return {lin: tuple(model.weights.shape(f"{model.arch.block_module(0, lin)}.weight"))
            for lin in model.arch.linears
            if f"{model.arch.block_module(0, lin)}.weight" in model.weights}


def estimate(model: Model, config, gflops: float | None = None, method=None) -> Plan:
    """Estimate ``quantize(model, config)`` followed by writing, on this machine; ``method``
    is the run's prepared method when known (an EXL2 run then counts only the blocks its
    measurement file still lacks). The shared stages are costed here from the method's
    ``needs_calibration``, ``statistic`` and ``attention_values``; its own stages come from
    its ``plan_costs``."""
    o = config.options
    if method is None:
        method = get_method(config.method)(config)
    shapes = _block_shapes(model)
    hidden = int(model.hparams.get("hidden_size", 0)) or max(s[1] for s in shapes.values())
    inter = max(max(s) for s in shapes.values())
    n_blocks = model.num_blocks
    params = sum(o_ * i for o_, i in shapes.values())
    calibrated = method.needs_calibration  # (a saved AWQ search or an imatrix file: not)
    tokens = o.calib_samples * o.calib_len if calibrated else 0
    ctx = o.calib_len if calibrated else 0
    parts: dict[str, float] = {}
    fwd = (2 * params + 2 * ctx * hidden) * tokens / 1e9          # one block forward
    if calibrated:
        parts["capture"] = fwd  # block 0's inputs
    if method.statistic == "hessian":  # GPTQ's sweep: gptq, exl2, awq --then gptq
        parts["forwards"] = 1.3 * fwd * n_blocks
        group_ins = [shapes[g[0]][1] for g in model.arch.sequential_groups if g[0] in shapes]
        parts["hessians"] = 2 * tokens * sum(i * i for i in group_ins) * n_blocks / 1e9
        parts["solves"] = sum(2 * i * i * out + i**3 for out, i in shapes.values()) \
            * n_blocks / 1e9
    if method.attention_values:
        heads, _ = model.arch.head_counts(model.hparams)
        # one more attention pass; per head P·X [ctx, ctx]x[ctx, hidden] and ZᵀZ
        parts["attention values"] = (fwd * 0.3 + 2 * tokens * heads * hidden * (ctx + hidden)
                                     / 1e9) * n_blocks
    if method.float_targets is not None:
        # the float model's own pass per block, and each group's cross term X_fᵀX_q + solve
        parts["float targets"] = (fwd + parts.get("hessians", 0.0) / n_blocks
                                  + parts.get("solves", 0.0) / n_blocks) * n_blocks
    for part, gflop in method.plan_costs(model, shapes, hidden, tokens, fwd).items():
        parts[part] = parts.get(part, 0) + gflop  # AWQ's searches, an EXL2 measurement
    if not calibrated:
        parts["rounding"] = 20 * params * n_blocks / 1e9
    block_bytes = params * 4
    acts = tokens * hidden * 4 * 3 + tokens * inter * 4
    if method.float_targets is not None:  # the float stream and its inner inputs
        acts += tokens * hidden * 4 * 2 + tokens * inter * 4
    stat = (inter * inter * 4 * 2) if calibrated else 0
    vocab = int(model.hparams.get("vocab_size", 0))
    embed = vocab * hidden * 4 if calibrated else 0
    peak = RUNTIME_BASE_BYTES + 2 * block_bytes + acts + stat + embed
    device = resolve_device(o.device) if calibrated else CPU
    overhead = 0.0
    if device.type == "cuda" and "solves" in parts:
        overhead = GPU_COLUMN_SECONDS * sum(i for _, i in shapes.values()) * n_blocks
    if device.type == "cuda" and "measurement solves" in parts:  # measured on the CPU today
        overhead += parts.pop("measurement solves") / (measure_gflops() * EFFICIENCY)
    return Plan(config.method, n_blocks, tokens, sum(parts.values()),
                gflops or machine_gflops(device), int(peak), parts, device.type,
                overhead)


def long_run_notice(model: Model, config, method) -> list[str]:
    """The plan of a calibrated run estimated above ``LONG_RUN_SECONDS``, in two lines: time,
    peak memory and calibration size, then how to make it smaller (with that estimate); no
    lines for a shorter run. A data-free run is not estimated: its rounding is seconds."""
    if not method.needs_calibration:
        return []
    o = config.options
    plan = estimate(model, config, method=method)
    if plan.seconds <= LONG_RUN_SECONDS:
        return []
    lines = [f"{config.method} {config.grid.describe()} on {model.source}: about "
             f"{_minutes(plan.seconds)} on {plan.device} (estimate), peak "
             f"{plan.peak_bytes / 2**30:.1f} GiB, calibration {o.calib_samples} × "
             f"{o.calib_len} tokens"]
    samples = min(SMALLER_CALIBRATION[0], o.calib_samples)
    length = min(SMALLER_CALIBRATION[1], o.calib_len)
    if (samples, length) == (o.calib_samples, o.calib_len):
        lines.append("--plan prints the estimate without running")
        return lines
    try:  # an option tied to the calibration size (EXL2's measurement windows) may refuse it
        fewer = dataclasses.replace(config, options=dataclasses.replace(
            o, calib_samples=samples, calib_len=length))
    except ConfigError:
        return [*lines, "--plan prints the estimate without running"]
    quick = estimate(model, fewer, gflops=plan.machine_gflops)
    lines.append(f"to make it smaller: --calib-samples {samples} --calib-len {length} (about "
                 f"{_minutes(quick.seconds)}); --plan prints the estimate without running")
    return lines


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def exl2_measurement(model: Model, config, shapes: dict[str, tuple[int, int]], hidden: int,
                      blocks: int) -> dict[str, float]:
    """The measurement pass of ``blocks`` blocks: each branch's forward once per candidate on
    the measurement windows, and GPTQ of every linear onto every rung of the ladder."""
    from quantbench.quant.exl2.presets import LADDER, branch_candidates

    o = config.options
    tokens = min(o.measure_samples, o.calib_samples) * o.calib_len
    params = sum(out * i for out, i in shapes.values())
    fwd = (2 * params + 2 * o.calib_len * hidden) * tokens / 1e9
    candidates = max(len(branch_candidates([lin for lin in shapes if lin.startswith(
        sub.mixer + ".")])) for sub in model.arch.sublayers) if model.arch.sublayers else \
        len(LADDER)
    ins = {i for _, i in shapes.values()}
    return {
        "measurement forwards": (2 + candidates) * fwd * blocks,
        "measurement hessians": 2 * tokens * sum(i * i for i in ins) * blocks / 1e9,
        "measurement solves": sum(len(LADDER) * 2 * i * i * out + i**3
                                  for out, i in shapes.values()) * blocks / 1e9,
    }

