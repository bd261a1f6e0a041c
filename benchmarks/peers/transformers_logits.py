"""Load a GPTQ checkpoint with transformers (+ optimum + GPTQModel's torch kernel) on CPU and
write its logits for given token ids. Run with the peer venv's python:

    /work/peers/gptqmodel/bin/python benchmarks/peers/transformers_logits.py CKPT IDS.json OUT.safetensors

The quantization settings come from the checkpoint's own config.json; only the kernel is
chosen here (``backend="torch"``, GPTQModel's CPU path)."""
import json
import os
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, GPTQConfig  # noqa: E402


def main(ckpt: str, ids_path: str, out: str) -> None:
    qc = json.load(open(os.path.join(ckpt, "config.json")))["quantization_config"]
    config = GPTQConfig(bits=qc["bits"], group_size=qc["group_size"], desc_act=qc["desc_act"],
                        sym=qc["sym"], backend="torch")
    model = AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu", dtype=torch.float16,
                                                 quantization_config=config).eval()
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    ids = torch.tensor(json.load(open(ids_path)))
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float()
    save_file({"logits": logits.contiguous()}, out, {"kernels": ",".join(kernels)})
    print(json.dumps({"kernels": kernels}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
