"""Upload an artifact to the Hugging Face Hub: its files, its manifest and a model card, in one
commit. The artifact directory is only read; the token is never printed, logged or stored."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from quantbench.errors import FormatError, HubError, QuantbenchError
from quantbench.formats.base import MANIFEST
from quantbench.formats.manifest import load_checked_manifest, verify_artifact
from quantbench.hub.card import (HUB_ID, artifact_manifest, base_model, load_manifest,
                                 render_model_card)

log = logging.getLogger(__name__)

CARD = "README.md"
NO_TOKEN = ("no Hugging Face token: set HF_TOKEN to a token with write access or run "
            "`hf auth login`")


@dataclass
class UploadResult:
    """What was (or, for a dry run, would be) uploaded, and where."""

    repo_id: str
    revision: str | None
    files: list[tuple[str, int]]  # (path in the repository, bytes)
    card: str | None
    commit_url: str | None  # None for a dry run
    private: bool = False
    dry_run: bool = False
    skipped: list[str] = field(default_factory=list)  # files in the directory, not in the manifest
    artifact_dir: Path = field(default=Path("."), repr=False)
    items: list[tuple[str, "Path | bytes"]] = field(default_factory=list, repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not HUB_ID.match(repo_id) or "--" in repo_id \
            or ".." in repo_id or len(repo_id) > 96:
        raise HubError(f"--repo {repo_id!r} is not a Hub repository id; use NAMESPACE/NAME, "
                       "e.g. your-name/smollm2-w4g64")


def _listed_files(artifact_dir: Path, verify: bool) -> dict[str, Any]:
    """The manifest's file table, after checking every file against it (``verify``; skipped
    with a warning otherwise, but a file it lists must still exist to be sent)."""
    load_manifest(artifact_dir)  # an output holding a manifest, or a one-line refusal
    verify_artifact(artifact_dir, verify)
    manifest = artifact_manifest(artifact_dir)
    listed = load_checked_manifest(
        manifest, todo="re-convert it (an upload sends the files it lists)")["files"]
    missing = sorted(n for n in listed if not (manifest.parent / n).is_file())
    if missing:
        raise FormatError(f"{artifact_dir}: {missing[0]} is missing ({manifest.name} lists it), "
                          "so it cannot be uploaded; re-convert the artifact")
    return listed


def _artifact_files(artifact_dir: Path, listed: dict[str, Any], card: str | None
                    ) -> tuple[list[tuple[str, Path | bytes]], list[str]]:
    """(path in repo, file or bytes) for the manifest's files, the manifest and the card; the
    files of its directory it does not list are left out (and named).

    A GGUF written as one file (``-o NAME.gguf``) goes with its sidecar under the sidecar's own
    name, ``NAME.gguf.quantbench.json``: a download is then that same pair, which ``inspect`` and
    ``eval NAME.gguf`` verify, and several quantizations of a model can share one repository
    (as GGUF repositories usually hold one file per type) without replacing each other's
    manifest. The folder around such a file is not the artifact's: nothing in it is named."""
    manifest = artifact_manifest(artifact_dir)
    folder = manifest.parent
    names = sorted(n for n in listed if not (card is not None and n == CARD)) + [manifest.name]
    items: list[tuple[str, Path | bytes]] = [(n, folder / n) for n in names]
    if card is not None:
        items.append((CARD, card.encode("utf-8")))
    if manifest.name != MANIFEST:
        return items, []
    skipped = sorted(p.name for p in folder.iterdir() if p.is_file()
                     and p.name not in listed and p.name != MANIFEST and not p.name.startswith("."))
    return items, skipped


def resolve_token(token: str | None = None) -> str:
    """The argument, else ``HF_TOKEN``, else the stored login; a one-line error if none."""
    if token and token.strip():
        return token.strip()
    if os.environ.get("HF_TOKEN", "").strip():
        return os.environ["HF_TOKEN"].strip()
    try:
        from huggingface_hub import get_token

        found = get_token()
    except Exception:  # e.g. an OIDC exchange that failed: same advice as no token
        found = None
    if not found:
        raise HubError(NO_TOKEN)
    return found


def scrub(text: str, token: str | None) -> str:
    """``text`` with every occurrence of the token masked."""
    return text.replace(token, "***") if token else text


def _http_message(exc, status: int | None, what: str, repo_id: str) -> str:
    if status == 401:
        return (f"the Hub rejected the token (401 Unauthorized) while {what}; set HF_TOKEN to a "
                "valid token with write access or run `hf auth login`")
    if status == 403:
        return (f"the token may not write to {repo_id} (403 Forbidden) while {what}; use a "
                "token with write access to that namespace")
    if status == 404:
        return (f"{repo_id} or its revision was not found (404) while {what}; check --repo "
                "and --revision")
    detail = getattr(exc, "server_message", None) or str(exc).strip().splitlines()[0]
    return f"the Hub answered {status or 'an error'} while {what} ({detail})"


@contextlib.contextmanager
def _hub_call(what: str, repo_id: str, token: str) -> Iterator[None]:
    """huggingface_hub's errors as one line without the token (and without the chained
    exception, which a --debug traceback would show)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except QuantbenchError:
        raise
    except HfHubHTTPError as exc:
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        message = _http_message(exc, status, what, repo_id)
        raise HubError(scrub(message, token)) from None
    except Exception as exc:  # network, file and protocol errors of the hub client
        first = (str(exc).strip().splitlines() or [""])[0]
        message = f"upload to {repo_id} failed while {what} ({type(exc).__name__}: {first})"
        raise HubError(scrub(message, token)) from None


@contextlib.contextmanager
def quiet_hub_progress() -> Iterator[None]:
    """huggingface_hub's own progress bars off while a caller shows its own (then restored)."""
    from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                       enable_progress_bars)

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _default_message(artifact_dir: Path) -> str:
    manifest = load_manifest(artifact_dir)
    q = manifest.get("quantize") or {}
    source = base_model(manifest) or Path(str((manifest.get("source") or {}).get("id"))).name
    return f"quantbench: {q.get('method')} {manifest.get('format')} quantization of {source}"


def plan_upload(artifact_dir: "str | os.PathLike", repo_id: str, *, private: bool = False,
                revision: str | None = None, card: bool = True,
                command: str | None = None, verify: bool = True) -> UploadResult:
    """Check the artifact (manifest present, every file matching its size and sha256, no
    unlisted file a loader would read; ``verify=False`` skips the checksums with a warning)
    and list what an upload would send, card included; no token, no network."""
    artifact_dir = Path(artifact_dir)
    _check_repo_id(repo_id)
    revision = None if revision in (None, "", "main") else revision
    listed = _listed_files(artifact_dir, verify)
    text = render_model_card(artifact_dir, repo_id=repo_id, command=command) if card else None
    items, skipped = _artifact_files(artifact_dir, listed, text)
    files = [(name, len(src) if isinstance(src, bytes) else src.stat().st_size)
             for name, src in items]
    return UploadResult(repo_id, revision, files, text, None, private, True, skipped,
                        artifact_dir, items)


def push(plan: UploadResult, *, commit_message: str | None = None, token: str | None = None,
         endpoint: str | None = None,
         on_file: Callable[[str, int], None] | None = None) -> UploadResult:
    """Send a planned upload (see ``plan_upload``); returns it with the commit URL."""
    secret = resolve_token(token)
    message = commit_message or _default_message(plan.artifact_dir)
    url = _push(plan.artifact_dir, plan.repo_id, plan.items, secret, private=plan.private,
                revision=plan.revision, endpoint=endpoint, on_file=on_file, message=message)
    return dataclasses.replace(plan, commit_url=url, dry_run=False)


def upload_artifact(artifact_dir: "str | os.PathLike", repo_id: str, *, private: bool = False,
                    revision: str | None = None, commit_message: str | None = None,
                    token: str | None = None, dry_run: bool = False, card: bool = True,
                    command: str | None = None, endpoint: str | None = None,
                    on_file: Callable[[str, int], None] | None = None,
                    verify: bool = True) -> UploadResult:
    """Upload ``artifact_dir`` (an output directory, or a GGUF written as ``NAME.gguf``) to the
    model repository ``repo_id`` (created if missing; on the branch ``revision``, created from
    main if missing) as one commit: the files its manifest lists (checksums verified first),
    the manifest (``quantbench.json``, or ``NAME.gguf.quantbench.json``) and, with ``card``, the
    model card as ``README.md``. ``dry_run`` only plans it: no token, no network. ``endpoint``
    defaults to ``HF_ENDPOINT``; ``on_file(path, bytes)`` is called as each file is uploaded;
    ``verify=False`` uploads the files without checking them against the manifest (a warning
    says so)."""
    plan = plan_upload(artifact_dir, repo_id, private=private, revision=revision, card=card,
                       command=command, verify=verify)
    if dry_run:
        return plan
    return push(plan, commit_message=commit_message, token=token, endpoint=endpoint,
                on_file=on_file)


def _push(artifact_dir: Path, repo_id: str, items: list[tuple[str, Path | bytes]], token: str, *,
          private: bool, revision: str | None, endpoint: str | None, message: str,
          on_file: Callable[[str, int], None] | None) -> str:
    """Create the repo (and branch), upload each file's content, then commit them all.

    ``create_commit`` rather than ``upload_large_folder``: an artifact is a handful of files
    (shards of at most 2 GiB), well within one commit's limits, and one commit keeps the repo
    consistent (no half-uploaded model visible) with our message, on our branch, with the card
    added from memory; ``upload_large_folder`` splits the upload into many automatic commits
    and keeps its resume state inside the folder, which we only read. Resuming works here
    too: each file's content goes to LFS/Xet storage first (``preupload_lfs_files``, file by
    file, so progress is reported), content the Hub already holds is not sent again, and files
    already committed unchanged are dropped from the commit, so re-running an interrupted
    upload sends only what is missing."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from quantbench import __version__

    api = HfApi(endpoint=endpoint, token=token, library_name="quantbench",
                library_version=__version__)
    with _hub_call("creating the repository", repo_id, token):
        api.create_repo(repo_id, private=True if private else None, exist_ok=True,
                        repo_type="model")
    if revision:
        with _hub_call(f"creating the branch {revision!r}", repo_id, token):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    operations = []
    for name, src in items:
        op = CommitOperationAdd(path_in_repo=name,
                                path_or_fileobj=src if isinstance(src, bytes) else str(src))
        with _hub_call(f"uploading {name}", repo_id, token):
            api.preupload_lfs_files(repo_id, additions=[op], repo_type="model",
                                    revision=revision, free_memory=False)
        operations.append(op)
        if on_file:
            on_file(name, op.upload_info.size)
    with _hub_call("committing", repo_id, token):
        info = api.create_commit(repo_id, operations, commit_message=message,
                                 repo_type="model", revision=revision)
    log.info("uploaded %d files of %s to %s", len(items), artifact_dir, repo_id)
    return str(info.commit_url)
