"""The model card (``README.md``) of an artifact, written from its ``quantbench.json``: YAML
metadata the Hub indexes, what was done, the evaluation against the baseline, size, how each
runtime loads it, and the command that reproduces it."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from quantbench.bits_per_weight import ALL_KEY, ALL_LABEL, QUANTIZED_KEY, QUANTIZED_LABEL
from quantbench.errors import FormatError
from quantbench.formats.base import GGUF_FILE, MANIFEST, read_manifest_file, sidecar_path
from quantbench.hub.command import convert_argv, eval_argv
from quantbench.hub.snippets import quantbench_snippet, runtime_snippets
from quantbench.jsonfile import dumps

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FORMAT_TAGS = {"gguf": "gguf", "gptq": "gptq", "awq": "awq", "exl2": "exl2",
               "bitsandbytes": "bitsandbytes", "compressed-tensors": "compressed-tensors"}
METHOD_TAGS = {"gptq": "gptq", "awq": "awq", "exl2": "exl2", "nf4": "nf4", "fp4": "fp4",
               "llm_int8": "llm.int8", "imatrix": "imatrix"}


def artifact_manifest(artifact: Path) -> Path:
    """Where the manifest of an artifact to describe or upload is: ``DIR/quantbench.json``, or
    ``NAME.gguf.quantbench.json`` beside a GGUF written with ``-o NAME.gguf``."""
    artifact = Path(artifact)
    if artifact.is_file() and artifact.suffix == ".gguf":
        return sidecar_path(artifact)
    if not artifact.is_dir():
        raise FormatError(f"{artifact} is not a directory or a .gguf file; pass a quantbench "
                          "output (the directory or the NAME.gguf that quantbench convert -o "
                          "wrote)")
    return artifact / MANIFEST


def load_manifest(artifact: Path) -> dict[str, Any]:
    """The artifact's manifest, or a one-line error naming what is missing."""
    from quantbench.localpath import missing

    if not Path(artifact).exists():
        raise FormatError(missing(Path(artifact), "a quantbench output (the directory or the "
                                                  "NAME.gguf that quantbench convert -o wrote)"))
    file = artifact_manifest(artifact)
    manifest = read_manifest_file(file)
    if manifest is None:
        where = "" if file.name == MANIFEST else " beside it"
        raise FormatError(f"{artifact} has no {file.name}{where}; only outputs written by "
                          "quantbench convert (or quantbench.save) can be described and uploaded")
    return manifest


def _sample_spec(source_id: str):
    from quantbench.models.sample import SAMPLES

    if source_id.startswith("sample:"):
        return SAMPLES.get(source_id.split(":", 1)[1])
    return None


def base_model(manifest: dict[str, Any]) -> str | None:
    """The source's Hub id: a bundled sample's origin, or a Hub id the source was fetched as
    (its path lies in the Hub cache); local checkpoints have none."""
    source = manifest.get("source") or {}
    sid = str(source.get("id") or "")
    spec = _sample_spec(sid)
    if spec is not None:
        return spec.hf_id
    if HUB_ID.match(sid) and f"models--{sid.replace('/', '--')}" in str(source.get("path")):
        return sid
    return None


def _front_matter(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.S)
    try:
        data = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def source_license(manifest: dict[str, Any]) -> str | None:
    """The source's license: a sample's recorded one, else the ``license`` of the source
    checkpoint's own model card; None when unknown (the card then states none)."""
    source = manifest.get("source") or {}
    spec = _sample_spec(str(source.get("id") or ""))
    if spec is not None:
        return spec.license
    path = Path(str(source.get("path") or ""))
    value = _front_matter(path / "README.md").get("license") if path.is_dir() else None
    return str(value) if isinstance(value, str) and value.strip() else None


def card_metadata(manifest: dict[str, Any]) -> dict[str, Any]:
    """The YAML front matter: base model, relation, license, library, tags."""
    q = manifest.get("quantize") or {}
    grid = q.get("grid") or {}
    fmt = str(manifest.get("format", "dense"))
    tags = ["quantized", "quantbench", FORMAT_TAGS.get(fmt), METHOD_TAGS.get(q.get("method"))]
    if grid.get("kind") in ("int", "codebook", "int8_row"):
        tags.append(f"{grid.get('bits', 4 if grid.get('kind') == 'codebook' else 8)}-bit")
    if grid.get("kind") == "gguf":
        tags.append(str(grid.get("type")))
    tags.append((manifest.get("source") or {}).get("architecture"))
    meta: dict[str, Any] = {}
    base = base_model(manifest)
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "quantized"
    license_id = source_license(manifest)
    if license_id:
        meta["license"] = license_id
    meta["library_name"] = "gguf" if fmt == "gguf" else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(dict.fromkeys(str(t) for t in tags if t))
    return meta


def _describe_grid(grid: dict[str, Any]) -> str:
    from quantbench.config import grid_from_dict

    try:
        return grid_from_dict(grid).describe()
    except Exception:  # a grid a newer quantbench wrote: show it as data
        return dumps(grid, what="the model card", sort_keys=True)


def _registered(kind: str, name: str) -> str:
    from quantbench.registry import get_format, get_method

    try:
        return (get_method if kind == "method" else get_format)(name).description
    except Exception:
        return ""


def _calibration(options: dict[str, Any], method: str) -> str:
    if options.get("imatrix_file"):
        return (f"none: importance read from the llama.cpp imatrix file "
                f"`{options['imatrix_file']}`")
    if "calib_samples" not in options:
        return "none (data-free: the weights alone decide the codes)"
    data = options.get("calib_data") or "the bundled C4 sample (en validation shard 0, " \
                                         "first 1,025 documents)"
    n, length = options["calib_samples"], options.get("calib_len", 512)
    text = (f"{data}: {n} windows × {length} tokens ({n * length:,} tokens), seed "
            f"{options.get('calib_seed', 0)}")
    text += ", chat template applied" if options.get("calib_chat_template") else ""
    if method == "awq":
        text += (f"; scales re-applied from `{options['search_file']}`" if options.get(
            "search_file") else f"; scale search on {options.get('search_samples')} windows")
    if method == "exl2":
        text += f"; measurement on {options.get('measure_samples')} windows"
    return text


def _what_was_done(manifest: dict[str, Any]) -> str:
    q = manifest.get("quantize") or {}
    source = manifest.get("source") or {}
    summary = manifest.get("summary") or {}
    targets = q.get("targets") or {}
    method, fmt = q.get("method", "?"), manifest.get("format", "?")
    kept = [name for name, on in (("embeddings", targets.get("embeddings")),
                                  ("lm_head", targets.get("lm_head"))) if not on]
    rows = [
        f"- **Source:** `{source.get('id')}` ({source.get('architecture')}, "
        f"{source.get('dtype')})" + (f" — {source['sample']}" if source.get("sample") else ""),
        f"- **Method:** `{method}` — {_registered('method', method)}".rstrip(" —"),
        f"- **Grid:** {_describe_grid(q.get('grid') or {})}",
        f"- **Format:** `{fmt}` — {_registered('format', fmt)}".rstrip(" —"),
        f"- **Quantized tensors:** {summary.get('quantized_tensors')}"
        + (f" ({' and '.join(kept)} kept in the source dtype)" if kept else ""),
        f"- **Calibration:** {_calibration(q.get('options') or {}, method)}",
    ]
    if manifest.get("passthrough"):  # a multimodal model's vision tower and projector
        rows.append("- **Not quantized:** " + ", ".join(
            f"{what} ({info.get('tensors')} tensors, {info.get('dtype')})"
            for what, info in manifest["passthrough"].items()) + ", copied as stored")
    if manifest.get("experts"):  # a mixture-of-experts model: calibration coverage
        from quantbench.quant.run import describe_coverage

        rows.append(f"- **Experts:** {describe_coverage(manifest['experts'])}; the router "
                    "is not quantized")
    if manifest.get("left_out"):  # a GGUF of a multimodal model: the text model only
        rows.append("- **Not in this file:** " + ", ".join(manifest["left_out"]) + " (llama.cpp "
                    "reads them from a separate mmproj file, which quantbench does not write)")
    for key, flag in (("include", "included"), ("exclude", "excluded")):
        if targets.get(key):
            rows.append(f"- **Modules {flag}:** " + ", ".join(f"`{p}`" for p in targets[key]))
    tool = manifest.get("tool") or {}
    rows.append(f"- **Tool:** quantbench {tool.get('version', '?')}, {manifest.get('created')}; "
                f"quantization took {summary.get('quantize_seconds')} s on "
                f"{summary.get('quantize_device', 'cpu')}")
    return "## What was done\n\n" + "\n".join(rows)


def _num(value: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "—"
    return f"{value * scale if scale != 1.0 else value:{spec}}{suffix}"


def _evaluation(manifest: dict[str, Any], single_file: bool = False) -> str:
    e = manifest.get("eval")
    if not e:
        what = "NAME.gguf` on the GGUF file" if single_file else "DIR` on the artifact directory"
        return (f"## Evaluation\n\n**Not evaluated** — run `quantbench eval {what} before "
                "uploading to add perplexity, KL divergence and top-1 agreement against the "
                "FP16 baseline here.")
    from quantbench.eval.protocol import EvalProtocol

    try:
        protocol = EvalProtocol.from_dict(e.get("protocol") or {}).describe()
    except Exception:
        protocol = dumps(e.get("protocol"), what="the model card", sort_keys=True)
    dtype = (manifest.get("source") or {}).get("dtype") or "FP16"
    return "\n".join([
        "## Evaluation",
        "",
        f"Measured by `quantbench eval` on the files in this repository (read back through the "
        f"`{manifest.get('format')}` reader) against the source model ({dtype} weights), both "
        f"computed in float32 on the same tokens. Protocol: {protocol}.",
        "",
        "| model | perplexity | Δppl | KLD mean | KLD p99 | top-1 agreement | tokens |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| baseline ({dtype}) | {_num(e.get('baseline_ppl'), '.4f')} | | | | | "
        f"{_num(e.get('n_tokens'), 'd')} |",
        f"| this model | {_num(e.get('ppl'), '.4f')} | {_num(e.get('delta_ppl_pct'), '+.3f', 1, ' %')} "
        f"| {_num(e.get('kld_mean'), '.5f')} | {_num(e.get('kld_p99'), '.4f')} "
        f"| {_num(e.get('top1'), '.2f', 100, ' %')} | {_num(e.get('n_tokens'), 'd')} |",
    ])


def weight_bytes(manifest: dict[str, Any], gguf_file: str = GGUF_FILE) -> int:
    """Bytes of the weight files (safetensors shards or the GGUF file ``gguf_file``; side files
    excluded)."""
    files = manifest.get("files") or {}
    if manifest.get("format") == "gguf" and gguf_file in files:
        return int(files[gguf_file]["bytes"])
    return int((manifest.get("summary") or {}).get("size_bytes") or 0)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def _size(manifest: dict[str, Any], gguf_file: str = GGUF_FILE) -> str:
    s = manifest.get("summary") or {}
    listed = {n: f for n, f in (manifest.get("files") or {}).items() if n != "README.md"}
    total = sum(int(f.get("bytes", 0)) for f in listed.values())
    n_files = len(listed)  # a README.md of the artifact is replaced by this card
    rows = [("weights on disk", _mb(weight_bytes(manifest, gguf_file))),
            # the repository holds the manifest's files, the manifest itself and this card
            ("files in this repository", f"{n_files + 2}: {n_files} model files of "
                                         f"{_mb(total)}, the manifest, README.md"),
            (QUANTIZED_LABEL, _num(s.get(QUANTIZED_KEY), "g")),
            (ALL_LABEL, _num(s.get(ALL_KEY), "g")),
            ("quantized weights", f"{_num(s.get('quantized_weights'), ',d')} of "
                                  f"{_num(s.get('total_weights'), ',d')}")]
    return "## Size\n\n| | |\n|---|---:|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


@dataclass(frozen=True)
class _Names:
    """How the card names the artifact's files once downloaded into the folder ``local``."""

    local: str
    gguf: str = GGUF_FILE  # the GGUF's name (``NAME.gguf`` for an output written as that file)
    manifest: str = MANIFEST  # ``NAME.gguf.quantbench.json`` beside such a file
    target: str = ""  # what quantbench commands take: the folder, or the GGUF in it

    @classmethod
    def of(cls, artifact: Path, local: str) -> "_Names":
        if artifact.is_file():  # -o NAME.gguf: the file and its sidecar
            return cls(local, artifact.name, sidecar_path(artifact).name,
                       f"{local}/{artifact.name}")
        return cls(local, target=local)

    @property
    def single_file(self) -> bool:
        return self.manifest != MANIFEST


def _usage(manifest: dict[str, Any], repo: str, names: _Names) -> str:
    parts = ["## How to use it"]
    local = names.local
    for title, lang, code in runtime_snippets(str(manifest.get("format")), repo, local,
                                              names.gguf):
        parts += ["", f"**{title}**", "", f"```{lang}", code.strip("\n"), "```"]
    source = (manifest.get("source") or {}).get("id") or ""
    baseline = None if source.startswith("sample:") or base_model(manifest) == source else \
        "SOURCE"
    title, lang, code = quantbench_snippet(repo, local, baseline, names.target, names.manifest)
    parts += ["", f"**{title}**", "", f"```{lang}", code.strip("\n"), "```"]
    return "\n".join(parts)


def _reproduce(manifest: dict[str, Any], names: _Names, command: str | None) -> str:
    recorded = manifest.get("command")
    target = names.target
    if not command and recorded and "--output" in recorded[:-1]:  # evaluate what it wrote
        target = recorded[recorded.index("--output") + 1]
    if command:
        text, note = command, "The command that wrote these files:"
    elif recorded:
        text = shlex.join(recorded)
        note = f"The command that wrote these files (as recorded in `{names.manifest}`):"
    else:
        argv, unset = convert_argv(manifest, names.target)
        text = shlex.join(argv)
        note = f"Rebuilt from the quantize config in `{names.manifest}`:"
        if unset:
            note += " (options without a command-line flag, set from Python: " + ", ".join(
                f"`{k}={v!r}`" for k, v in unset.items()) + ")"
    lines = ["## Reproduce", "", note, "", "```bash", text]
    if manifest.get("eval"):
        lines.append(shlex.join(eval_argv(manifest, target)))
    return "\n".join(lines + ["```"])


def render_model_card(artifact_dir: Path, *, repo_id: str | None = None,
                      command: str | None = None) -> str:
    """The ``README.md`` for ``artifact_dir`` (an output directory, or a GGUF written as one
    file) uploaded as ``repo_id``: YAML front matter, then what was done, evaluation, size,
    usage per runtime and the reproduce command."""
    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)
    local = (repo_id or "").split("/")[-1] or (artifact_dir.stem if artifact_dir.is_file()
                                                else artifact_dir.name) or "model"
    names = _Names.of(artifact_dir, local)
    repo = repo_id or f"YOUR_NAME/{local}"
    meta = yaml.safe_dump(card_metadata(manifest), sort_keys=False, allow_unicode=True)
    q = manifest.get("quantize") or {}
    title = repo.split("/")[-1]
    intro = (f"`{(manifest.get('source') or {}).get('id')}` quantized with quantbench: "
             f"`{q.get('method')}` on {_describe_grid(q.get('grid') or {})}, written in the "
             f"`{manifest.get('format')}` layout. Sizes and scores below are those of the files "
             "in this repository.")
    sections = [f"# {title}", intro, _what_was_done(manifest),
                _evaluation(manifest, names.single_file), _size(manifest, names.gguf),
                _usage(manifest, repo, names),
                _reproduce(manifest, names, command)]
    return f"---\n{meta}---\n\n" + "\n\n".join(sections) + "\n"
