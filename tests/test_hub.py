"""`dsv2 download` (and Hub repo ids elsewhere) against a loopback Hub (``tests/hub_server.py``)."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dsv2cli.checkpoint import hub as hub_module
from dsv2cli.checkpoint.hub import download_checkpoint
from dsv2cli.checkpoint.loader import load_checkpoint
from dsv2cli.checkpoint.resolve import resolve_config
from dsv2cli.checkpoint.verify import verify_checkpoint
from dsv2cli.cli.main import app
from dsv2cli.errors import CheckpointError
from tests.helpers import reference_model, save_reference
from tests.hub_server import FakeHub, Repo

runner = CliRunner()
WEIGHTS_AND_CONFIGS = {"config.json", "generation_config.json", "model.safetensors.index.json"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return save_reference(reference_model(seed=6), tmp_path_factory.mktemp("src") / "tiny", shard_size="90KB")


@pytest.fixture
def hub(source, tmp_path, monkeypatch):
    """A fresh loopback Hub, an empty HF cache and no token or offline setting from the environment."""
    import huggingface_hub.constants as constants

    repo = Repo.from_directory(source)
    repo.files["README.md"] = b"# tiny\n"
    repo.files["pytorch_model.bin"] = b"pickled weights that must not be fetched"
    server = FakeHub(
        repos={
            "owner/tiny": repo,
            "owner/gated": Repo(dict(repo.files), gated_token="hf_secret"),
            "owner/pickled": Repo({"config.json": repo.files["config.json"], "pytorch_model.bin": b"x" * 64}),
        }
    )
    monkeypatch.setenv("HF_ENDPOINT", server.start())
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield server
    server.stop()


def _shards(source: Path) -> list[str]:
    return sorted(p.name for p in source.glob("*.safetensors"))


def _fetched(hub: FakeHub) -> set[str]:
    return {r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}


def test_download_fetches_only_what_dsv2_needs_and_loads(hub, source):
    report = download_checkpoint("owner/tiny")
    expected = WEIGHTS_AND_CONFIGS | set(_shards(source))
    assert set(report.files) == expected and _fetched(hub) == expected
    directory = Path(report.directory)
    assert directory.name == hub.repos["owner/tiny"].commit and "models--owner--tiny" in str(directory)
    tokens = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(directory)(tokens), load_checkpoint(source)(tokens))
    verified = verify_checkpoint(directory)  # the cache's blob names are the Hub's sha256s
    assert verified.ok and verified.files_hashed == len(_shards(source))


@pytest.mark.parametrize(
    ("hf_hub_offline", "transformers_offline"),
    [("1", None), ("true", None), ("On", None), ("YES", None), (" 1", None), ("false", None), ("0", None), ("", None)]
    + [(None, "1"), (None, "yes"), ("", "1"), ("0", "1"), (None, None)],
)
def test_offline_is_read_as_huggingface_hub_reads_it(monkeypatch, hf_hub_offline, transformers_offline):
    from huggingface_hub import constants

    for name, value in (("HF_HUB_OFFLINE", hf_hub_offline), ("TRANSFORMERS_OFFLINE", transformers_offline)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    expected = constants._is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))
    assert hub_module.hub_offline() is expected


def test_complete_files_are_not_fetched_again_and_offline_uses_the_cache(hub, monkeypatch):
    first = download_checkpoint("owner/tiny")
    hub.requests.clear()
    again = download_checkpoint("owner/tiny")
    assert again.directory == first.directory and _fetched(hub) == set()
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = download_checkpoint("owner/tiny")
    assert offline.offline and offline.files == first.files and hub.requests == []


def test_cut_off_transfer_resumes_with_a_range_request(hub, source, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)  # so the cut lands after whole chunks were written
    shard = _shards(source)[3]
    hub.cut_once.add(shard)
    report = download_checkpoint("owner/tiny")
    first, second = hub.downloads(shard)
    assert first.range is None and second.range is not None
    resumed_at = int(second.range.removeprefix("bytes=").rstrip("-"))
    size = (source / shard).stat().st_size
    assert 0 < resumed_at <= size // 2
    assert (Path(report.directory) / shard).read_bytes() == (source / shard).read_bytes()


def test_a_failed_run_is_resumed_by_the_next_one(hub, source, tmp_path):
    shard = _shards(source)[5]
    hub.failing.add(shard)
    with pytest.raises(CheckpointError, match="connection to the Hub was lost"):
        download_checkpoint("owner/tiny")
    snapshot = tmp_path / "cache" / "models--owner--tiny" / "snapshots" / hub.repos["owner/tiny"].commit
    kept = {p.name for p in snapshot.iterdir()}
    assert kept and shard not in kept
    hub.failing.clear()
    hub.requests.clear()
    report = download_checkpoint("owner/tiny")
    assert _fetched(hub) == set(report.files) - kept  # complete files were not fetched again
    assert (Path(report.directory) / shard).read_bytes() == (source / shard).read_bytes()


def test_local_dir_with_the_cli(hub, source, tmp_path):
    target = tmp_path / "lite"
    result = runner.invoke(app, ["download", "owner/tiny", "--local-dir", str(target), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert Path(report["directory"]) == target.resolve() and report["bytes"] == sum(report["files"].values())
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".")) == sorted(report["files"])
    verified = verify_checkpoint(target)  # local-dir metadata records each file's ETag, the sha256
    assert verified.ok and verified.files_hashed == len(_shards(source))


def test_revision(hub):
    commit = hub.repos["owner/tiny"].commit
    assert Path(download_checkpoint("owner/tiny", revision=commit).directory).name == commit
    with pytest.raises(CheckpointError, match="no revision by that name"):
        download_checkpoint("owner/tiny", revision="v9")


def _cli_error(*args: str) -> str:
    result = runner.invoke(app, ["download", *args])
    assert result.exit_code == 1 and "Traceback" not in result.output
    return result.stderr


def test_unknown_repo(hub):
    assert "repository owner/nope not found on the Hub" in _cli_error("owner/nope")


def test_gated_repo_needs_a_token(hub, monkeypatch):
    stderr = _cli_error("owner/gated")
    assert "owner/gated is gated and this token has no access" in stderr and "HF_TOKEN" in stderr
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    report = download_checkpoint("owner/gated")
    assert "config.json" in report.files
    assert any(r.authorization == "Bearer hf_secret" for r in hub.requests if "/resolve/" in r.path)


def test_repo_with_pickled_weights_only(hub):
    stderr = _cli_error("owner/pickled")
    assert "pytorch_model.bin" in stderr and "never unpickles" in stderr
    assert _fetched(hub) == set()


def test_no_network(hub, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    assert "cannot be reached" in _cli_error("owner/tiny")


def test_offline_without_a_cached_copy(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "not (completely) in the local Hugging Face cache" in _cli_error("owner/tiny")
    assert hub.requests == []


def test_resolve_config_fetches_only_the_config(hub, source):
    resolved = resolve_config("owner/tiny")
    assert resolved.source == "hub" and resolved.config.num_hidden_layers == 3
    assert _fetched(hub) == {"config.json"}


def test_convert_a_repo_id(hub, tmp_path):
    result = runner.invoke(app, ["convert", "owner/tiny", str(tmp_path / "native"), "--format", "json", "--no-probe"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["source_layout"] == "hf" and verify_checkpoint(tmp_path / "native").ok


def test_verify_catches_a_damaged_cache_blob(hub, source):
    directory = Path(download_checkpoint("owner/tiny").directory)
    shard = _shards(source)[0]
    blob = (directory / shard).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    problems = verify_checkpoint(directory).problems
    assert len(problems) == 1 and problems[0].startswith(f"{shard}: sha256 ")
