"""Dump GPTQModel's own dequantization of a GPTQ checkpoint (and optionally its logits), on CPU.

Run with the peer venv, not quantbench's:

    GPTQMODEL_CPU_WORKERS=2 /work/peers/gptqmodel/bin/python benchmarks/peers/gptqmodel_dequantize.py \
        --model GPTQ_DIR --out reference.safetensors [--ids ids.json]

Loads the checkpoint with ``GPTQModel.load(dir, backend=BACKEND.TORCH, device="cpu", dtype=...)``
(BACKEND.TORCH resolves to GPTQ_TORCH -> ``TorchLinear``) and writes, for every quantized linear,
``<module>.weight`` = ``module.dequantize_weight().T`` as float32 ``[out_features, in_features]``
(``--weight-dtype float16`` stores the same values losslessly at half the size).
``dequantize_weight()`` is GPTQModel's method (it returns ``[in, out]`` in the scales dtype;
v1 ``format=gptq`` qzeros are converted to v2 in memory at load, so the stored zero+1 offset
is already applied). With ``--ids`` (JSON list of token ids, or list of equal-length lists) it
also runs the loaded model and stores ``__logits__`` (float32 ``[B, L, vocab]``) and
``__ids__`` (int64 ``[B, L]``). Provenance goes into the safetensors metadata.
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
    ap.add_argument("--model", required=True, help="GPTQ checkpoint dir written by GPTQModel (or compatible)")
    ap.add_argument("--out", required=True, type=Path, help="output .safetensors")
    ap.add_argument("--ids", type=Path, help="JSON token ids ([L] or [B][L]) to run for __logits__")
    ap.add_argument("--dtype", default="float16", choices=["auto", "float16", "bfloat16"],
                    help="runtime dtype; 'auto' = GPTQModel's CPU pick (bfloat16, which rounds the fp16 scales)")
    ap.add_argument("--weight-dtype", default="float32", choices=["float32", "float16"],
                    help="storage dtype of <module>.weight. float16 is lossless when the runtime dtype is "
                         "float16 (dequantize_weight() computes in the scales dtype; checked per tensor) "
                         "and halves the file, e.g. for small test fixtures")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)

    import torch
    from safetensors.torch import save_file

    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

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
        "backend": "BACKEND.TORCH",
        "kernels": ",".join(sorted(kernels)),
        "runtime_dtype": str(model.dtype),
        "source": str(Path(args.model).name),
        "weight_layout": f"[out_features, in_features] {args.weight_dtype} = dequantize_weight().T",
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
