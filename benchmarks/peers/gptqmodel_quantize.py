"""Quantize an HF llama checkpoint with GPTQModel (peer baseline), on CPU.

Run with the peer venv, not quantbench's:

    GPTQMODEL_CPU_WORKERS=2 /work/peers/gptqmodel/bin/python benchmarks/peers/gptqmodel_quantize.py \
        --model DIR --windows windows.json --bits 4 --group-size 128 --desc-act --sym --out OUT

``--windows`` is a JSON list of lists of token ids ``[N][L]`` (preferred: no pickle) or a
``.pt`` file holding an int tensor ``[N, L]``. Each window becomes one calibration row
``{"input_ids": [...], "attention_mask": [1]*L}``; GPTQModel needs no tokenizer for these,
but its loader still requires the checkpoint directory to contain a tokenizer.

Last stdout line: one JSON object with ``quantize_s`` (wall seconds of ``model.quantize``),
``total_s`` (whole run incl. imports, load and save) and the resolved config.
Tested against gptqmodel 7.6.0 (torch 2.13.0+cpu, transformers 5.24.0).
"""
from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# GPTQModel sizes its CPU worker pool from this at import time; keep CUDA out of the picture.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def load_windows(path: Path) -> list[list[int]]:
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
    else:
        import torch

        rows = torch.load(path, map_location="cpu", weights_only=True)
        rows = rows.tolist() if hasattr(rows, "tolist") else rows
    if not rows or not all(isinstance(r, list) and r and all(isinstance(t, int) for t in r) for r in rows):
        raise SystemExit(f"{path}: expected a non-empty [N][L] list of token ids")
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF llama checkpoint dir (fp16/bf16/fp32)")
    ap.add_argument("--windows", required=True, type=Path, help=".json [N][L] token ids, or .pt [N, L]")
    ap.add_argument("--out", required=True, help="output dir for the GPTQ checkpoint")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--sym", dest="sym", action="store_true", default=True)
    ap.add_argument("--asym", dest="sym", action="store_false")
    ap.add_argument("--static-groups", action="store_true", default=False)
    ap.add_argument("--damp", type=float, default=0.01, help="damp_percent (GPTQModel default is 0.05)")
    ap.add_argument("--damp-auto-increment", type=float, default=None,
                    help="GPTQModel retries with damp += this when H is not PD (its default 0.01)")
    ap.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=False,
                    help="GPTQModel's GAR reordering; 7.6.0 turns it ON by default when desc_act is off. "
                         "Default here: off, i.e. classic GPTQ (set --act-group-aware for GPTQModel's default)")
    ap.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--format", default="gptq", choices=["gptq", "gptq_v2"])
    ap.add_argument("--dtype", default="float16", choices=["auto", "float16", "bfloat16", "float32"],
                    help="model dtype while quantizing; 'auto' = GPTQModel's CPU pick (bfloat16)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--no-offload", action="store_true",
                    help="offload_to_disk=False (GPTQModel default offloads finished layers to a temp dir)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    windows = load_windows(args.windows)

    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    import gptqmodel

    t_import = time.perf_counter() - _T0
    qcfg_kwargs = dict(
        bits=args.bits,
        group_size=args.group_size,
        desc_act=args.desc_act,
        sym=args.sym,
        static_groups=args.static_groups,
        damp_percent=args.damp,
        act_group_aware=args.act_group_aware,
        true_sequential=args.true_sequential,
        format=args.format,
        device="cpu",
    )
    if args.damp_auto_increment is not None:
        qcfg_kwargs["damp_auto_increment"] = args.damp_auto_increment
    if args.no_offload:
        qcfg_kwargs["offload_to_disk"] = False
    qcfg = QuantizeConfig(**qcfg_kwargs)

    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    t = time.perf_counter()
    model = GPTQModel.load(args.model, qcfg, dtype=dtype, backend=BACKEND.TORCH)
    load_s = time.perf_counter() - t

    calibration = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
    t = time.perf_counter()
    model.quantize(calibration, batch_size=args.batch_size, backend=BACKEND.TORCH)
    quantize_s = time.perf_counter() - t

    t = time.perf_counter()
    model.save(args.out)
    save_s = time.perf_counter() - t

    import resource

    result = {
        "tool": "gptqmodel",
        "version": gptqmodel.__version__,
        "torch": torch.__version__,
        "model": str(args.model),
        "out": str(args.out),
        "n_windows": len(windows),
        "window_len": len(windows[0]),
        "bits": qcfg.bits,
        "group_size": qcfg.group_size,
        "desc_act": qcfg.desc_act,
        "sym": qcfg.sym,
        "static_groups": qcfg.static_groups,
        "damp_percent": qcfg.damp_percent,
        "damp_auto_increment": qcfg.damp_auto_increment,
        "act_group_aware": qcfg.act_group_aware,
        "true_sequential": qcfg.true_sequential,
        "format": str(getattr(qcfg.format, "value", qcfg.format)),
        "dtype": str(model.model.dtype),
        "cpu_workers": int(os.environ["GPTQMODEL_CPU_WORKERS"]),
        "torch_threads": torch.get_num_threads(),
        "import_s": round(t_import, 3),
        "load_s": round(load_s, 3),
        "quantize_s": round(quantize_s, 3),
        "save_s": round(save_s, 3),
        "total_s": round(time.perf_counter() - _T0, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
