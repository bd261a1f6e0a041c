"""Dump GPTQModel's own dequantization of a GPTQ or AWQ checkpoint (and optionally its logits), on CPU.

Run with the peer venv, not quantbench's:

    GPTQMODEL_CPU_WORKERS=2 /work/peers/gptqmodel/bin/python benchmarks/peers/gptqmodel_dequantize.py \
        --model GPTQ_OR_AWQ_DIR --out reference.safetensors [--ids ids.json] [--format auto|gptq|awq]

Loads the checkpoint with ``GPTQModel.load(dir, backend=BACKEND.TORCH, device="cpu", dtype=...)``
(BACKEND.TORCH resolves to GPTQ_TORCH -> ``TorchLinear``) and writes, for every quantized linear,
``<module>.weight`` = ``module.dequantize_weight().T`` as float32 ``[out_features, in_features]``
(``--weight-dtype float16`` stores the same values losslessly at half the size).
``dequantize_weight()`` is GPTQModel's method (it returns ``[in, out]`` in the scales dtype;
v1 ``format=gptq`` qzeros are converted to v2 in memory at load, so the stored zero+1 offset
is already applied). With ``--ids`` (JSON list of token ids, or list of equal-length lists) it
also runs the loaded model and stores ``__logits__`` (float32 ``[B, L, vocab]``) and
``__ids__`` (int64 ``[B, L]``). Provenance goes into the safetensors metadata.

AWQ GEMM checkpoints (``quant_method: "awq"``; ``--format auto`` reads it from the checkpoint's
config) load through the same call: ``BACKEND.TORCH`` resolves to AWQ_TORCH -> ``AwqTorchLinear``,
an eager kernel (no torch.compile) that keeps qweight/qzeros/scales as stored. Its weight is
``dequantize_gemm(qweight, qzeros, scales, bits, group_size)`` -- the function its ``forward()``
multiplies by -- stored transposed like the GPTQ case. (``AWQuantLinear`` inherits GPTQ's
``dequantize_weight()``, which reads the packing the GPTQ way, so it is not used for AWQ.)
GPTQModel.load ignores AutoAWQ's ``modules_to_not_convert`` (it logs "Ignoring unknown
parameter") and would run a listed module as an all-zero quantized linear; the script refuses
such a load unless the config also carries GPTQModel's ``dynamic`` "-:" rule for the module.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True,
                    help="GPTQ or AWQ (GEMM) checkpoint dir written by GPTQModel, AutoAWQ or quantbench")
    ap.add_argument("--out", required=True, type=Path, help="output .safetensors")
    ap.add_argument("--ids", type=Path, help="JSON token ids ([L] or [B][L]) to run for __logits__")
    ap.add_argument("--dtype", default="float16", choices=["auto", "float16", "bfloat16"],
                    help="runtime dtype; 'auto' = GPTQModel's CPU pick (bfloat16, which rounds the fp16 scales)")
    ap.add_argument("--weight-dtype", default="float32", choices=["float32", "float16"],
                    help="storage dtype of <module>.weight. float16 is lossless when the runtime dtype is "
                         "float16 (dequantize_weight() computes in the scales dtype; checked per tensor) "
                         "and halves the file, e.g. for small test fixtures")
    ap.add_argument("--format", default="auto", choices=["auto", "gptq", "awq"],
                    help="checkpoint family; auto = config's quant_method. The loaded kernels must "
                         "belong to it (GPTQ: BaseQuantLinear.dequantize_weight(); AWQ: dequantize_gemm)")
    return ap.parse_args(argv)


def quantization_config(model_dir: str) -> dict:
    """config.json's quantization_config, else quant_config.json / quantize_config.json."""
    root = Path(model_dir)
    config = root / "config.json"
    if config.is_file():
        q = json.loads(config.read_text()).get("quantization_config")
        if q:
            return q
    for name in ("quant_config.json", "quantize_config.json"):
        if (root / name).is_file():
            return json.loads((root / name).read_text())
    return {}


def checkpoint_format(qcfg: dict) -> str:
    method = str(qcfg.get("quant_method") or qcfg.get("method") or "").lower()
    if method == "awq" or "zero_point" in qcfg or "w_bit" in qcfg:
        return "awq"
    return "gptq"


def excluded_modules(qcfg: dict) -> list[str]:
    """AutoAWQ ``modules_to_not_convert`` entries that GPTQModel's ``dynamic`` does not skip."""
    import re

    listed = qcfg.get("modules_to_not_convert") or []
    skips = [k[2:] for k in (qcfg.get("dynamic") or {}) if k.startswith("-:")]
    return [m for m in listed if not any(re.match(p, m) for p in skips)]


def main(argv=None) -> dict:
    args = parse_args(argv)

    import torch
    from safetensors.torch import save_file

    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import AWQuantLinear, BaseQuantLinear
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    qcfg = quantization_config(args.model)
    fmt = checkpoint_format(qcfg) if args.format == "auto" else args.format

    torch.manual_seed(0)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    qmodel = GPTQModel.load(args.model, backend=BACKEND.TORCH, device="cpu", dtype=dtype)
    model = qmodel.model.eval()

    tensors: dict[str, torch.Tensor] = {}
    kernels = set()
    with torch.inference_mode():
        for name, mod in model.named_modules():
            if not isinstance(mod, BaseQuantLinear):
                continue
            kernels.add(type(mod).__name__)
            if isinstance(mod, AWQuantLinear) != (fmt == "awq"):
                raise SystemExit(f"{name}: kernel {type(mod).__name__} is not a {fmt} kernel")
            if fmt == "awq":
                if type(mod).__name__ != "AwqTorchLinear":
                    raise SystemExit(f"{name}: {type(mod).__name__} repacks the AWQ tensors; "
                                     "use the default backend (torch -> AwqTorchLinear)")
                # exactly what AwqTorchLinear.forward() multiplies by: [in, out], scales dtype
                w = dequantize_gemm(qweight=mod.qweight, qzeros=mod.qzeros, scales=mod.scales,
                                    bits=mod.bits, group_size=mod.group_size)
            else:
                w = mod.dequantize_weight()  # [in, out], scales dtype
            w = w.detach().to(torch.float32).t().contiguous()
            if args.weight_dtype == "float16":
                w16 = w.to(torch.float16)
                if not torch.equal(w16.to(torch.float32), w):
                    raise SystemExit(f"{name}: dequantized weight is not exactly fp16-representable")
                w = w16
            if tuple(w.shape) != (mod.out_features, mod.in_features):
                raise SystemExit(f"{name}: dequantized shape {tuple(w.shape)} != "
                                 f"({mod.out_features}, {mod.in_features})")
            tensors[f"{name}.weight"] = w
        if not tensors:
            raise SystemExit(f"{args.model}: no GPTQModel quantized linears found")
        ignored = [m for m in excluded_modules(qcfg) if f"{m}.weight" in tensors]
        if ignored:
            raise SystemExit(f"GPTQModel.load ignores modules_to_not_convert and quantized "
                             f"{', '.join(ignored)} (no weights for it in the checkpoint); add a "
                             "'dynamic' {'-:^<module>$': {}} rule or load through transformers")

        ids = None
        if args.ids is not None:
            ids = json.loads(args.ids.read_text())
            if ids and isinstance(ids[0], int):
                ids = [ids]
            ids_t = torch.tensor(ids, dtype=torch.long)
            logits = model(input_ids=ids_t).logits
            tensors["__logits__"] = logits.detach().to(torch.float32).contiguous()
            tensors["__ids__"] = ids_t

    meta = {
        "tool": "gptqmodel",
        "gptqmodel_version": gptqmodel.__version__,
        "torch_version": torch.__version__,
        "format": fmt,
        "backend": "BACKEND.TORCH",
        "kernels": ",".join(sorted(kernels)),
        "runtime_dtype": str(model.dtype),
        "source": str(Path(args.model).name),
        "weight_layout": f"[out_features, in_features] {args.weight_dtype} = "
                         + ("dequantize_gemm(...).T" if fmt == "awq" else "dequantize_weight().T"),
    }
    if ids is not None:
        meta["ids"] = json.dumps(ids)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=meta)
    summary = {**meta, "out": str(args.out), "n_linears": sum(1 for k in tensors if not k.startswith("__"))}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
