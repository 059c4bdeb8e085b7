"""The commit routine: a fault or a kill at every write and rename point, an OUTPUT that appears mid-run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dsv2cli import commit
from dsv2cli.commit import Output, recover
from dsv2cli.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
OPS = ("_rename", "_rename2", "_remove", "_fsync")


def _tree(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _write_new(staging: Path) -> None:
    (staging / "sub").mkdir()
    (staging / "weights.bin").write_bytes(b"new" * 100)
    (staging / "sub" / "state.json").write_text('{"step": 2}')


NEW = {"weights.bin": b"new" * 100, "sub/state.json": b'{"step": 2}'}
OLD = {"keep.txt": b"old"}


def _old(path: Path) -> None:
    path.mkdir()
    (path / "keep.txt").write_bytes(b"old")


def _run(path: Path, replace: bool) -> None:
    target = Output.claim(path, kind="dir", replace=replace)
    with target.staged() as staging:
        _write_new(staging)


def _count_ops(monkeypatch, fail_at: int | None, exchange: bool) -> list[str]:
    calls: list[str] = []
    for name in OPS:
        original = getattr(commit, name)

        def wrapped(*args, _original=original, _name=name):
            if _name == "_rename2" and not exchange:
                return False
            calls.append(_name)
            if fail_at is not None and len(calls) == fail_at:
                raise OSError(5, "injected fault")
            return _original(*args)

        monkeypatch.setattr(commit, name, wrapped)
    return calls


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "overwrite"])
def test_a_fault_at_every_operation_loses_nothing(tmp_path, monkeypatch, exchange, existing):
    with monkeypatch.context() as m:  # how many operations one commit makes
        probe = tmp_path / "probe"
        if existing:
            _old(probe)
        calls = _count_ops(m, None, exchange)
        _run(probe, existing)
        total = len(calls)
    assert total >= 3
    for n in range(1, total + 1):
        root = tmp_path / f"case{n}"
        root.mkdir()
        output = root / "out"
        if existing:
            _old(output)
        with monkeypatch.context() as m:
            _count_ops(m, n, exchange)
            try:
                _run(output, existing)
            except InputError:
                pass
        # Right after the fault: OUTPUT is the old copy or the new one, complete, or (fresh) absent.
        after = _tree(output) if output.exists() else None
        assert after in ((OLD, NEW) if existing else (None, NEW)), (n, after)
        _run(output, True)
        assert _tree(output) == NEW
        assert [p.name for p in root.iterdir()] == ["out"], n


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from dsv2cli import commit
    calls = [0]
    for name in {ops!r}:
        original = getattr(commit, name)
        def wrapped(*args, _original=original, _name=name):
            if _name == "_rename2" and sys.argv[3] == "0":
                return False
            calls[0] += 1
            if calls[0] == int(sys.argv[2]):
                os._exit(9)
            return _original(*args)
        setattr(commit, name, wrapped)
    target = commit.Output.claim(sys.argv[1], kind="dir", replace=True)
    with target.staged() as staging:
        (staging / "sub").mkdir()
        (staging / "weights.bin").write_bytes(b"new" * 100)
        (staging / "sub" / "state.json").write_text('{{"step": 2}}')
    """
).format(ops=OPS)


@pytest.mark.parametrize("exchange", ["1", "0"], ids=["exchange", "two-renames"])
def test_a_kill_at_every_operation_of_overwrite_is_recovered(tmp_path, exchange):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for n in range(1, 12):
        root = tmp_path / f"kill{n}"
        root.mkdir()
        output = root / "out"
        _old(output)
        done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(output), str(n), exchange], env=env, capture_output=True)
        assert done.returncode in (0, 9), done.stderr.decode()
        recover(output)  # what the next run does first
        assert _tree(output) in (OLD, NEW), n
        assert [p.name for p in root.iterdir()] == ["out"], n
        _run(output, True)
        assert _tree(output) == NEW
        if done.returncode == 0:
            break
    else:
        pytest.fail("the commit never finished within the counted operations")


def test_output_appearing_mid_run_is_left_alone(tmp_path):
    output = tmp_path / "out"
    target = Output.claim(output)
    with pytest.raises(InputError, match="changed while this command ran") as caught:
        with target.staged() as staging:
            _write_new(staging)
            output.mkdir()
            (output / "theirs.txt").write_text("theirs")
    assert _tree(output) == {"theirs.txt": b"theirs"}
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.result-")]
    assert len(kept) == 1 and str(kept[0]) in caught.value.message and _tree(kept[0]) == NEW


def test_an_empty_output_directory_filled_mid_run_is_left_alone(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    target = Output.claim(output, allow_empty=True)
    with pytest.raises(InputError, match="changed while this command ran"):
        with target.staged() as staging:
            _write_new(staging)
            (output / "theirs.txt").write_text("theirs")
    assert _tree(output) == {"theirs.txt": b"theirs"}


def test_an_empty_output_directory_takes_every_later_commit(tmp_path):
    # dsv2 train --out EMPTY_DIR checkpoints again and again into the directory it filled itself.
    output = tmp_path / "out"
    output.mkdir()
    target = Output.claim(output, allow_empty=True)
    for step in (1, 2, 3):
        with target.staged() as staging:
            (staging / "state.json").write_text(f'{{"step": {step}}}')
    assert _tree(output) == {"state.json": b'{"step": 3}'}


def test_overwritten_output_replaced_by_another_mid_run_is_left_alone(tmp_path):
    output = tmp_path / "out"
    _old(output)
    target = Output.claim(output, replace=True)
    with pytest.raises(InputError, match="changed"):
        with target.staged() as staging:
            _write_new(staging)
            os.rename(output, tmp_path / "moved")
            output.mkdir()
    assert _tree(tmp_path / "moved") == OLD and output.is_dir() and not any(output.iterdir())


def test_overwrite_replaces_a_symlink_not_its_target(tmp_path):
    real = tmp_path / "real"
    _old(real)
    link = tmp_path / "out"
    link.symlink_to(real)
    _run(link, True)
    assert not link.is_symlink() and _tree(link) == NEW and _tree(real) == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]


def test_claim_checks_writability_up_front(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(InputError, match="cannot write"):
            Output.claim(locked / "out")
    finally:
        locked.chmod(0o755)


def test_current_directory_as_output(tmp_path, monkeypatch):
    work = tmp_path / "work"
    _old(work)
    monkeypatch.chdir(work)
    _run(Path("."), True)
    assert _tree(tmp_path / "work") == NEW
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_file_outputs(tmp_path):
    path = tmp_path / "report.json"
    commit.write_file(path, b"one")
    commit.write_file(path, b"two")
    assert path.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        commit.write_file(tmp_path / "dir.json", b"x")
