"""Hugging Face Hub access through huggingface_hub (cache, offline mode, token from the usual places).

Only the files dsv2 needs are fetched: safetensors shards and index, configs and tokenizer files.
"""

from __future__ import annotations

from pathlib import Path

from dsv2cli.errors import CheckpointError

NEEDED_FILES = [
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


def _hub_error(repo_id: str, exc: Exception) -> CheckpointError:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return CheckpointError(
            f"{repo_id} is gated and this token has no access", hint="accept the terms on the Hub and log in (HF_TOKEN)"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return CheckpointError(
            f"repository {repo_id} not found on the Hub", hint="check the spelling, or log in if it is private"
        )
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return CheckpointError(
            f"{repo_id} is not in the local Hugging Face cache and it cannot be downloaded now (offline or no network)",
            hint="run `dsv2 download` with network access, or unset HF_HUB_OFFLINE",
        )
    if isinstance(exc, errors.EntryNotFoundError):
        return CheckpointError(f"{repo_id} has no such file: {exc}")
    return CheckpointError(f"could not fetch {repo_id}: {exc}")


def fetch_config(repo_id: str, revision: str | None = None) -> Path:
    """Local path of the repo's ``config.json`` (cache first, download when allowed)."""
    from huggingface_hub import errors, hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.EntryNotFoundError, OSError, ValueError) as exc:
        raise _hub_error(repo_id, exc) from exc


def fetch_checkpoint(repo_id: str, download: bool = True, revision: str | None = None) -> Path:
    """Local snapshot directory of a repo with the files dsv2 needs."""
    from huggingface_hub import errors, snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=NEEDED_FILES, local_files_only=not download))
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.EntryNotFoundError, OSError, ValueError) as exc:
        raise _hub_error(repo_id, exc) from exc
