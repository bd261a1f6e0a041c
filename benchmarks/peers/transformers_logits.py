"""Load a GPTQ or AWQ (GEMM) checkpoint with transformers (+ GPTQModel's kernels; GPTQ also
needs optimum) on CPU and write its logits for given token ids. Run with the peer venv's python:

    /work/peers/gptqmodel/bin/python benchmarks/peers/transformers_logits.py CKPT IDS.json OUT.safetensors [BACKEND]

The quantization settings come from the checkpoint's own config.json (transformers takes only
``backend`` from the config passed here); only the kernel is chosen here. BACKEND defaults to
GPTQModel's eager torch kernel: ``torch`` (GPTQ -> ``TorchLinear``) or ``torch_awq`` (AWQ ->
``AwqTorchLinear``). ``auto`` passes no quantization_config, i.e. what a plain
``from_pretrained`` picks on CPU (GPTQ: ``TorchAtenLinear``, AWQ: ``TorchAtenAwqLinear``, both
the ATen int4pack kernel, which computes in bfloat16 with bfloat16 scales)."""
import json
import os
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig  # noqa: E402


def main(ckpt: str, ids_path: str, out: str, backend: str | None = None) -> None:
    qc = json.load(open(os.path.join(ckpt, "config.json")))["quantization_config"]
    awq = str(qc.get("quant_method", "")).lower() == "awq"
    backend = backend or ("torch_awq" if awq else "torch")
    kwargs = {}
    if backend != "auto":
        if awq:
            config = AwqConfig(bits=qc["bits"], group_size=qc["group_size"],
                               zero_point=qc.get("zero_point", True),
                               version=qc.get("version", "gemm"), backend=backend)
        else:
            config = GPTQConfig(bits=qc["bits"], group_size=qc["group_size"],
                                desc_act=qc["desc_act"], sym=qc["sym"], backend=backend)
        kwargs["quantization_config"] = config
    model = AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu", dtype=torch.float16,
                                                 **kwargs).eval()
    quantized = sorted(n for n, m in model.named_modules() if hasattr(m, "qweight"))
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    ids = torch.tensor(json.load(open(ids_path)))
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float()
    save_file({"logits": logits.contiguous()}, out,
              {"kernels": ",".join(kernels), "quantized": ",".join(quantized)})
    print(json.dumps({"kernels": kernels, "n_quantized": len(quantized)}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
