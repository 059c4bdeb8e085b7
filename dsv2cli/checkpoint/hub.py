"""Hugging Face Hub access through huggingface_hub (cache or local dir, offline mode, token from the usual places).

Only the files dsv2 needs are fetched: safetensors shards and index, configs, tokenizer and chat
template files. The token is huggingface_hub's: ``HF_TOKEN`` or a saved ``hf auth login``.
``HF_ENDPOINT`` is read when a function is called (not only when huggingface_hub is imported),
``HF_HUB_OFFLINE=1`` (or ``offline=True``) uses the cache only.

Resuming: files already complete (in the cache or the local dir) are never fetched again, and a
transfer cut off half-way is resumed by huggingface_hub with an HTTP ``Range`` request from the
byte it stopped at.
"""

from __future__ import annotations

import fnmatch
import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from dsv2cli.checkpoint.files import INDEX_NAME, MODEL_FILES
from dsv2cli.errors import CheckpointError, InputError

NEEDED_FILES = ["*.safetensors", INDEX_NAME, *MODEL_FILES]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl"]

# Exception class names of httpx / httpx2 / requests, matched by name so no HTTP client is imported here.
_UNREACHABLE = ("ConnectError", "ConnectTimeout", "ConnectionError")
_CUT_OFF = ("RemoteProtocolError", "ReadError", "WriteError", "ReadTimeout", "NetworkError", "TimeoutException")
_TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # huggingface_hub.constants.ENV_VARS_TRUE_VALUES


@dataclass
class DownloadReport:
    repo_id: str
    revision: str | None
    directory: str
    files: dict[str, int]  # name -> bytes on disk
    seconds: float
    offline: bool

    @property
    def bytes(self) -> int:
        return sum(self.files.values())

    def to_json(self) -> dict:
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "directory": self.directory,
            "offline": self.offline,
            "files": self.files,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
        }


def _endpoint() -> str | None:
    """``HF_ENDPOINT`` when set, checked to be an http(s) URL with a host."""
    value = os.environ.get("HF_ENDPOINT") or None
    if value is not None:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(
                f"HF_ENDPOINT={value[:80]!r} is not an http(s) URL",
                hint="unset it, or set it to a mirror like https://hf-mirror.com",
            )
    return value


def hub_offline() -> bool:
    """Whether the environment asks for the cache only, parsed as huggingface_hub parses it.

    ``HF_HUB_OFFLINE`` (else ``TRANSFORMERS_OFFLINE``) is one of 1/ON/YES/TRUE in any case, as in
    ``huggingface_hub.constants``; read when called, where huggingface_hub reads it once, at import.
    """
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in _TRUE_VALUES


def _offline(offline: bool) -> bool:
    from huggingface_hub import constants  # on use: huggingface_hub takes 0.1-0.2 s to import; most commands never need it

    return offline or constants.HF_HUB_OFFLINE or hub_offline()


def _is_a(exc: BaseException, names: tuple[str, ...]) -> bool:
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def _is_network_error(exc: BaseException) -> bool:
    return _is_a(exc, _UNREACHABLE + _CUT_OFF)


def _hub_error(repo_id: str, exc: BaseException) -> CheckpointError:
    from huggingface_hub import errors  # on use, as in _offline

    if isinstance(exc, errors.GatedRepoError):
        return CheckpointError(
            f"{repo_id} is gated and this token has no access", hint="accept the terms on the Hub and log in (HF_TOKEN)"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return CheckpointError(f"{repo_id} has no revision by that name", hint="check `revision` (a branch, tag or commit)")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return CheckpointError(
            f"repository {repo_id} not found on the Hub", hint="check the spelling, or log in if it is private"
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, errors.HfHubHTTPError) and status is not None and status not in (401, 403):
        return CheckpointError(
            f"{_endpoint() or 'https://huggingface.co'} answered HTTP {status} for {repo_id}",
            hint="check the repository name and HF_ENDPOINT",
        )
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)) or _is_a(exc, _UNREACHABLE):
        where = _endpoint() or "https://huggingface.co"
        return CheckpointError(
            f"{repo_id} is not (completely) in the local Hugging Face cache and cannot be downloaded now "
            f"(offline, or {where} cannot be reached)",
            hint="run `dsv2 download` with network access, or unset HF_HUB_OFFLINE",
        )
    if _is_a(exc, _CUT_OFF):  # after the unreachable case: httpx's ConnectError is a NetworkError too
        return CheckpointError(
            f"the connection to the Hub was lost while fetching {repo_id} ({type(exc).__name__})",
            hint="run the same command again: complete files are kept and only the rest is fetched",
        )
    if isinstance(exc, errors.EntryNotFoundError):
        return CheckpointError(f"{repo_id} has no such file: {exc}")
    if isinstance(exc, errors.HfHubHTTPError) and exc.response is not None and exc.response.status_code in (401, 403):
        return CheckpointError(
            f"the Hub refused access to {repo_id} (HTTP {exc.response.status_code})",
            hint="check your token (HF_TOKEN or `hf auth login`) and that it may read this repository",
        )
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CheckpointError(f"could not fetch {repo_id}: {first_line}")


def _hub_call(repo_id: str, call):
    """Run a huggingface_hub call, turning every expected failure into one CheckpointError."""
    from huggingface_hub import errors  # on use, as in _offline

    try:
        return call()
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.EntryNotFoundError, OSError, ValueError) as exc:
        raise _hub_error(repo_id, exc) from exc
    except Exception as exc:
        if _is_network_error(exc) or isinstance(exc, errors.OfflineModeIsEnabled):
            raise _hub_error(repo_id, exc) from exc
        raise


def select_files(repo_files: list[str], repo_id: str) -> list[str]:
    """The repo files dsv2 needs; a repo with pickled weights only (or none) is refused here."""
    needed = sorted(f for f in repo_files if any(fnmatch.fnmatch(f, p) for p in NEEDED_FILES))
    if not any(f.endswith(".safetensors") for f in needed):
        pickled = sorted(f for f in repo_files if any(fnmatch.fnmatch(f, p) for p in PICKLE_PATTERNS))
        if pickled:
            shown = ", ".join(pickled[:3]) + (f" and {len(pickled) - 3} more" if len(pickled) > 3 else "")
            raise CheckpointError(
                f"{repo_id} has weights only in pickle form ({shown}); dsv2 never unpickles weights",
                hint="use a repository that ships .safetensors files",
            )
        raise CheckpointError(f"{repo_id} has no safetensors weights", hint="is this a model repository?")
    if "config.json" not in needed:
        raise CheckpointError(f"{repo_id} has no config.json", hint="is this a DeepSeek-V2 model repository?")
    return needed


def download_checkpoint(
    repo_id: str,
    revision: str | None = None,
    local_dir: str | Path | None = None,
    offline: bool = False,
) -> DownloadReport:
    """Fetch the files dsv2 needs from ``repo_id`` into the HF cache (or ``local_dir``)."""
    from huggingface_hub import HfApi, snapshot_download  # on use, as in _offline

    offline = _offline(offline)
    start = time.perf_counter()
    patterns = NEEDED_FILES
    if not offline:
        # One plain request (no retry loop), so a missing network is reported at once; it also lists the files.
        api = HfApi(endpoint=_endpoint())
        info = _hub_call(repo_id, lambda: api.model_info(repo_id, revision=revision))
        patterns = select_files([s.rfilename for s in info.siblings or []], repo_id)
    directory = Path(
        _hub_call(
            repo_id,
            lambda: snapshot_download(
                repo_id,
                revision=revision,
                local_dir=local_dir,
                allow_patterns=patterns,
                local_files_only=offline,
                endpoint=_endpoint(),
            ),
        )
    )
    files = {
        name: (directory / name).stat().st_size
        for name in sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
        if any(fnmatch.fnmatch(name, pattern) for pattern in NEEDED_FILES) and not name.startswith(".cache")
    }
    if offline and not any(name.endswith(".safetensors") for name in files):
        select_files(list(files), repo_id)
    return DownloadReport(repo_id, revision, str(directory), files, time.perf_counter() - start, offline)


def fetch_config(repo_id: str, revision: str | None = None) -> Path:
    """Local path of the repo's ``config.json`` (cache first, download when allowed)."""
    from huggingface_hub import hf_hub_download  # on use, as in _offline

    return Path(
        _hub_call(
            repo_id,
            lambda: hf_hub_download(
                repo_id, "config.json", revision=revision, endpoint=_endpoint(), local_files_only=_offline(False)
            ),
        )
    )


def fetch_checkpoint(repo_id: str, download: bool = True, revision: str | None = None) -> Path:
    """Local snapshot directory of a repo with the files dsv2 needs."""
    return Path(download_checkpoint(repo_id, revision=revision, offline=not download).directory)
