"""How each runtime loads a format: short code snippets for the model card."""
from __future__ import annotations

Snippet = tuple[str, str, str]  # (title, language, code)

_PROMPT = "The capital of France is"

_TRANSFORMERS = '''\
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo}")
model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")
inputs = tokenizer("{prompt}", return_tensors="pt").to(model.device)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))
'''

_GPTQMODEL = '''\
from gptqmodel import GPTQModel

model = GPTQModel.load("{repo}")
print(model.tokenizer.decode(model.generate("{prompt}", max_new_tokens=32)[0]))
'''

_LLAMACPP = '''\
hf download {repo} {gguf} --local-dir {local}
llama-cli -m {local}/{gguf} -p "{prompt}" -n 32
llama-server -m {local}/{gguf}   # OpenAI-compatible server on :8080
'''

_EXLLAMAV2 = '''\
from huggingface_hub import snapshot_download
from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
from exllamav2.generator import ExLlamaV2DynamicGenerator

config = ExLlamaV2Config(snapshot_download("{repo}"))
model = ExLlamaV2(config)
cache = ExLlamaV2Cache(model, lazy=True)
model.load_autosplit(cache)
generator = ExLlamaV2DynamicGenerator(model=model, cache=cache,
                                      tokenizer=ExLlamaV2Tokenizer(config))
print(generator.generate(prompt="{prompt}", max_new_tokens=32))
'''

_VLLM = "vllm serve {repo}\n"

_QUANTBENCH = '''\
hf download {repo} --local-dir {local}
quantbench inspect {target}   # format, grid, bits per weight; checksums verified
quantbench eval {target}{baseline}   # perplexity, KLD, top-1 against the baseline
'''

# format -> (title, language, template, pip requirements)
_RUNTIMES: dict[str, list[tuple[str, str, str, str]]] = {
    "gguf": [("llama.cpp", "bash", _LLAMACPP, "")],
    "gptq": [("transformers (with GPTQModel installed)", "python", _TRANSFORMERS,
              "transformers optimum gptqmodel"),
             ("GPTQModel", "python", _GPTQMODEL, "gptqmodel")],
    "awq": [("transformers (with GPTQModel installed)", "python", _TRANSFORMERS,
             "transformers gptqmodel"),
            ("GPTQModel", "python", _GPTQMODEL, "gptqmodel")],
    "compressed-tensors": [("transformers", "python", _TRANSFORMERS,
                            "transformers compressed-tensors"),
                           ("vLLM", "bash", _VLLM, "vllm")],
    "bitsandbytes": [("transformers (with bitsandbytes installed)", "python", _TRANSFORMERS,
                      "transformers accelerate bitsandbytes")],
    "exl2": [("exllamav2 (CUDA GPU; the layout follows exllamav2's format, not yet run "
              "through exllamav2 itself by quantbench's tests)", "python", _EXLLAMAV2,
              "exllamav2")],
    "dense": [("transformers", "python", _TRANSFORMERS, "transformers")],
}


def runtime_snippets(fmt: str, repo: str, local: str, gguf: str = "model.gguf") -> list[Snippet]:
    """The runtimes that load ``fmt``, each with a snippet (requirements as a comment);
    ``gguf``: the GGUF file's name in the repository."""
    snippets = []
    for title, lang, template, pip in _RUNTIMES.get(fmt, _RUNTIMES["dense"]):
        code = template.format(repo=repo, local=local, prompt=_PROMPT, gguf=gguf)
        if pip:
            code = f"# pip install {pip}\n{code}"
        snippets.append((title, lang, code))
    return snippets


def quantbench_snippet(repo: str, local: str, baseline: str | None, target: str | None = None,
                       manifest: str = "quantbench.json") -> Snippet:
    """quantbench itself reads every format back (and re-measures it); ``target``: what its
    commands take, the download folder ``local`` or the GGUF file in it (``local/NAME.gguf``,
    with its ``manifest`` beside it)."""
    extra = f" --baseline {baseline}" if baseline else ""
    code = _QUANTBENCH.format(repo=repo, local=local, target=target or local, baseline=extra)
    if baseline:
        code += f"# SOURCE: the checkpoint it was quantized from (see {manifest})\n"
    return "quantbench (every format)", "bash", code
