"""Load a GPTQ checkpoint with GPTQModel's own loader (``GPTQModel.load``, its torch kernel)
on CPU and write its logits for given token ids: for the models transformers' GPTQ integration
cannot load, mixture-of-experts ones (transformers 5 holds their experts as fused 3-D
parameters; GPTQModel unfuses them into per-expert linears). Run with the peer venv's python:

    /work/peers/gptqmodel/bin/python benchmarks/peers/gptqmodel_logits.py CKPT IDS.json OUT.safetensors
"""
import json
import os
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def main(ckpt: str, ids_path: str, out: str) -> None:
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(os.path.abspath(ckpt), backend=BACKEND.TORCH, device="cpu",
                           dtype=torch.float16)
    net = model.model.eval()
    quantized = sorted(n for n, m in net.named_modules() if hasattr(m, "qweight"))
    kernels = sorted({type(m).__name__ for m in net.modules() if hasattr(m, "qweight")})
    ids = torch.tensor(json.load(open(ids_path)))
    with torch.inference_mode():
        logits = net(input_ids=ids).logits.float()
    save_file({"logits": logits.contiguous()}, out,
              {"kernels": ",".join(kernels), "quantized": ",".join(quantized)})
    print(json.dumps({"kernels": kernels, "n_quantized": len(quantized)}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
