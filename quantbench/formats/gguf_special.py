"""Special tokens of a GGUF vocabulary: gguf-py's ``SpecialVocab`` for HF tokenizer files.

The merges, special token ids (``tokenizer.ggml.{bos,eos,unknown,seperator,padding,mask,eot,eom}
_token_id``), ``add_{bos,eos,sep}_token`` flags, chat template(s) and normalizer flags that
llama.cpp's converter writes after the vocabulary, read from ``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``/``.json`` and ``config.json`` (JSON only).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGUFValueType as VT

from quantbench.errors import ConfigError
from quantbench.formats.gguf_kv import KV, read_json

log = logging.getLogger(__name__)

SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
ID_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
           "sep": "seperator_token_id", "pad": "padding_token_id", "mask": "mask_token_id",
           "eot": "eot_token_id", "eom": "eom_token_id"}  # cls has no key (gguf-py skips it)
ADD_KEYS = ("bos", "eos", "sep")


@dataclass
class _Special:
    """gguf-py SpecialVocab's state while it reads tokenizer.json, tokenizer_config, config."""
    tok_cfg: dict | None
    n_vocab: int | None
    types: list[str] = field(default_factory=lambda: list(SPECIAL_TYPES))
    ids: dict[str, int] = field(default_factory=dict)
    add: dict[str, bool] = field(default_factory=dict)

    def set_id(self, typ: str, tid: Any) -> None:
        if not isinstance(tid, int) or isinstance(tid, bool) or typ in self.ids:
            return
        if tid < 0:
            raise ConfigError(f"invalid {typ} token id {tid}")
        if self.n_vocab is None or tid < self.n_vocab:
            self.ids[typ] = tid
        else:
            log.warning("%s token id %d is outside the vocabulary; skipped", typ, tid)

    def cfg(self, typ: str) -> Any:
        return (self.tok_cfg or {}).get(f"{typ}_token")

    def set_cfg(self, typ: str, value: Any) -> None:
        if self.tok_cfg:
            self.tok_cfg[f"{typ}_token"] = value


def special_metadata(model_dir: Path, load_merges: bool = False,
                     n_vocab: int | None = None) -> list[KV]:
    """Merges, special token ids, ``add_{bos,eos,sep}_token``, the chat template and normalizer
    flags, as gguf-py's ``SpecialVocab(model_dir, load_merges, n_vocab).add_to_gguf`` writes them:
    ids from tokenizer_config (looked up among tokenizer.json's added tokens), then config.json;
    add flags from the tokenizer.json post-processor, then tokenizer_config."""
    model_dir = Path(model_dir)
    tok_json = read_json(model_dir / "tokenizer.json")
    sp = _Special(read_json(model_dir / "tokenizer_config.json"), n_vocab)
    if tok_json is not None:
        _post_processors(sp, tok_json)
    template = _from_tokenizer_config(sp, model_dir, (tok_json or {}).get("added_tokens", []))
    config = read_json(model_dir / "config.json") or {}
    for typ in sp.types:
        tid = config.get(f"{typ}_token_id")
        sp.set_id(typ, (config.get("text_config") or {}).get(f"{typ}_token_id")
                  if tid is None else tid)
    merges = _merges(model_dir, tok_json) if load_merges else []
    if load_merges and not merges:
        log.warning("no BPE merges found in %s; llama.cpp may not tokenize correctly", model_dir)
    kvs = [KV("tokenizer.ggml.merges", merges, VT.ARRAY, VT.STRING)] if merges else []
    kvs += [KV(f"tokenizer.ggml.{ID_KEYS[t]}", i, VT.UINT32) for t, i in sp.ids.items()
            if t in ID_KEYS]
    kvs += [KV(f"tokenizer.ggml.add_{t}_token", v, VT.BOOL) for t, v in sp.add.items()
            if t in ADD_KEYS]
    return kvs + _template_kvs(template) + _normalizer_kvs((tok_json or {}).get("normalizer"))


def _sid(item: dict) -> Any:
    return item.get("SpecialToken", {}).get("id")


def _post_processors(sp: _Special, tok_json: dict) -> None:
    """The add flags implied by tokenizer.json's post-processor(s)."""
    bos, cls, eos, sep = (sp.cfg(t) for t in ("bos", "cls", "eos", "sep"))
    if not bos and cls and sp.tok_cfg:
        sp.set_cfg("bos", cls)
        bos = cls
    if not eos and sep and sp.tok_cfg:
        sp.set_cfg("eos", sep)
        eos = sep
    post = tok_json.get("post_processor") or {}
    for proc in post.get("processors", [post]) if post else []:
        kind = proc.get("type")
        if kind == "ByteLevel":
            sp.add.setdefault("bos", False)
            sp.add.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            sp.add.update(bos=True, eos=True, sep=True)
            if not cls and sp.tok_cfg:
                cls = proc.get("cls", [bos])[0]
                sp.set_cfg("cls", cls)
            if not sep and sp.tok_cfg:
                sep = proc.get("sep", [eos])[0]
                sp.set_cfg("sep", sep)
        elif kind == "TemplateProcessing":
            bos, cls, eos, sep = _template_processing(sp, proc, bos, cls, eos, sep)


def _template_processing(sp: _Special, proc: dict, bos: Any, cls: Any, eos: Any,
                         sep: Any) -> tuple[Any, Any, Any, Any]:
    """gguf-py's crude reading of a TemplateProcessing: leading special → add_bos, trailing
    special → add_eos, a separator between A and B → add_sep."""
    single, pair = proc.get("single", []), proc.get("pair", [])
    first = last = None
    if len(single) > 1:
        if first := _sid(single[0]):
            if not sp.tok_cfg:
                bos = first
            elif first not in (bos, cls):
                if not bos:
                    bos = first
                    sp.set_cfg("bos", first)
                if not cls:
                    cls = first
                    sp.set_cfg("cls", first)
            sp.add["bos"] = first in (bos, cls)
        if last := _sid(single[-1]):
            if not sp.tok_cfg:
                eos = last
            elif last != eos:
                extra = next((t for t in ("eot", "eom") if t not in sp.types), None)
                if extra:
                    sp.types.append(extra)
                    sp.set_cfg(extra, eos)
                sp.set_cfg("eos", last)
                eos = last
            sp.add["eos"] = last == eos
    start = 1 if pair and first and _sid(pair[0]) == first else 0
    stop = -1 if pair and last and _sid(pair[-1]) == last else None
    pair = pair[start:stop]
    ends = [p.get("Sequence", {}).get("id") for p in pair[:1] + pair[-1:]]
    if ends == ["A", "B"] and len(pair) > 2:
        mid = pair[1:-1]
        add_sep = bool(_sid(mid[0]) and _sid(mid[0]) in (sep, eos) and not last)
        if len(mid) == 2 and _sid(mid[1]) and _sid(mid[1]) in (sep, eos):
            add_sep = True
        sp.add["sep"] = add_sep
        if add_sep and not sep and sp.tok_cfg:
            sp.set_cfg("sep", eos)
    return bos, cls, eos, sep


def _from_tokenizer_config(sp: _Special, model_dir: Path, added: list[dict]) -> Any:
    """Add flags and ids named in tokenizer_config; returns the chat template."""
    if not sp.tok_cfg:
        return None
    template = _chat_template(model_dir, sp.tok_cfg)
    for typ in list(sp.types):
        flag = sp.tok_cfg.get(f"add_{typ}_token")
        if isinstance(flag, bool) and typ not in sp.add:
            sp.add[typ] = flag
        entry = sp.tok_cfg.get(f"{typ}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str):
            sp.set_id(typ, next((a.get("id") for a in added if a.get("content") == content), None))
    return template


def _chat_template(model_dir: Path, tok_cfg: dict) -> Any:
    alt = None
    if (model_dir / "chat_template.jinja").is_file():
        alt = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
        extra = sorted((model_dir / "additional_chat_templates").glob("*.jinja"))
        if extra:
            alt = [{"name": "default", "template": alt}] + [
                {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
    elif (model_dir / "chat_template.json").is_file():
        alt = (read_json(model_dir / "chat_template.json") or {}).get("chat_template")
    template = tok_cfg.get("chat_template", alt)
    return template if template is None or isinstance(template, (str, list)) else None


def _template_kvs(template: Any) -> list[KV]:
    """``tokenizer.chat_template`` (and named ``tokenizer.chat_template.<name>`` variants)."""
    if not template:
        return []
    if isinstance(template, str):
        return [KV("tokenizer.chat_template", template, VT.STRING)]
    kvs, names, default = [], [], None
    for choice in template:
        name = re.sub(r"[^A-Za-z0-9]", "_", choice.get("name", ""))
        text = choice.get("template")
        if not name or text is None:
            continue
        if name == "default":
            default = text
        elif name not in names:
            names.append(name)
            kvs.append(KV(f"tokenizer.chat_template.{name}", text, VT.STRING))
    if names:
        kvs.append(KV("tokenizer.chat_templates", names, VT.ARRAY, VT.STRING))
    return kvs + ([KV("tokenizer.chat_template", default, VT.STRING)] if default else [])


def _merges(model_dir: Path, tok_json: dict | None) -> list[str]:
    """BPE merges as "a b" strings (pairs with spaces encoded as U+0120), else merges.txt."""
    merges = ((tok_json or {}).get("model") or {}).get("merges")
    if isinstance(merges, list) and merges:
        if isinstance(merges[0], str):
            return merges
        return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    path = model_dir / "merges.txt"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    lines = lines[1:] if lines and lines[0].strip().startswith("#") else lines
    return [" ".join(parts) for line in lines if len(parts := line.strip().split(None, 3)) == 2]


def _normalizer_kvs(normalizer: dict | None) -> list[KV]:
    """``tokenizer.ggml.normalizer.{lowercase,strip_accents}`` from tokenizer.json."""
    flags: dict[str, bool] = {}

    def visit(norm: dict) -> None:
        kind = norm.get("type")
        if kind == "Lowercase":
            flags["lowercase"] = True
        elif kind == "StripAccents":
            flags["strip_accents"] = True
        elif kind == "BertNormalizer":
            flags.update({k: norm[k] for k in ("lowercase", "strip_accents") if k in norm})
        elif kind == "Sequence":
            for child in norm.get("normalizers", []):
                visit(child)
    if normalizer:
        visit(normalizer)
    return [KV(f"tokenizer.ggml.normalizer.{k}", bool(flags[k]), VT.BOOL)
            for k in ("lowercase", "strip_accents") if flags.get(k) is not None]
