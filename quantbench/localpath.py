"""A local path or a Hugging Face Hub id? And the one-line messages for a path that is missing
or is not what the command reads. Pure string and file-system checks: no torch, no network.

A Hub id is ``org/name`` (one slash, letters, digits, ``-_.``). Anything a user types that
also could be a Hub id (``out/model``) is only sent to the Hub when nothing says it is a local
path; a typo in a local path must read "does not exist", not as a network error.
"""
from __future__ import annotations

import os
from pathlib import Path

# Endings of files quantbench reads or writes; no Hub repository name ends in one of these.
LOCAL_SUFFIXES = (".gguf", ".safetensors", ".json", ".jsonl", ".bin", ".pt", ".pth", ".yaml",
                  ".yml", ".txt", ".gz", ".png")

ARTIFACT = ("a quantbench artifact is what `quantbench convert SRC -o OUT` writes: a folder "
            "with its weights, config.json and quantbench.json (or a .gguf file)")


def looks_local(text: "str | os.PathLike") -> bool:
    """Whether ``text`` names a local path even though it may not exist: it starts with ``.``,
    ``/`` or ``~``, holds a backslash or more than one ``/``, ends in a file extension
    quantbench uses (``.gguf``, ``.safetensors``, ``.json``, ...), or its first part is a
    directory here (``out/nope`` next to an ``out/`` folder)."""
    text = os.fspath(text)
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        return True
    if text.lower().endswith(LOCAL_SUFFIXES):
        return True
    head = text.split("/", 1)[0]
    return "/" in text and Path(head).is_dir()


def missing(text: "str | os.PathLike", what: str) -> str:
    """``X does not exist; pass WHAT`` — for a local-looking path that is not there."""
    path = Path(os.fspath(text)).expanduser()
    parent = path.parent
    where = "" if parent == Path(".") or parent.is_dir() else f" (nor does {parent})"
    return f"{text} does not exist{where}; pass {what}"


def not_an_artifact(path: "str | os.PathLike", command: str) -> str:
    """The refusal of a directory that is neither an artifact nor a model checkpoint, for
    ``command`` (``eval``, ``inspect``): what an artifact is and how to make one."""
    return (f"{path} is neither a quantbench artifact nor a model checkpoint (it has no "
            f"config.json); {ARTIFACT}; pass one to quantbench {command}, or a checkpoint "
            "folder (config.json and *.safetensors)")
