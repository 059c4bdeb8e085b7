"""Reading inputs for expert statistics: per-file cutting, JSON lines, --max-tokens, errors."""

import json

import pytest

from dsv2cli.analysis.text_inputs import read_sequences
from dsv2cli.errors import InputError
from dsv2cli.inference.tokenizer import TextTokenizer
from tests.helpers import save_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> TextTokenizer:
    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(directory)
    tok = TextTokenizer.from_directory(directory)
    assert tok is not None
    return tok


def test_each_file_is_cut_on_its_own(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("def add(a, b):\n    return a + b\n")
    (tmp_path / "b.txt").write_text("for item in items:\n    print(item)\n")
    (tmp_path / ".hidden").write_text("ignored")
    a, b = (tokenizer.encode((tmp_path / name).read_text()) for name in ("a.txt", "b.txt"))
    result = read_sequences([tmp_path], tokenizer, 320, seq_len=5)
    expected = [a[i : i + 5] for i in range(0, len(a), 5)] + [b[i : i + 5] for i in range(0, len(b), 5)]
    assert [s.token_ids for s in result.sequences] == expected
    assert result.files == 2 and not result.truncated
    assert result.sequences[0].source.endswith("a.txt")


def test_jsonl_lines_are_never_packed(tokenizer, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "hello there"}) + "\n" + json.dumps({"prompt_token_ids": [3, 4, 5, 6, 7]}) + "\n")
    result = read_sequences([path], tokenizer, 320, seq_len=3)
    hello = tokenizer.encode("hello there")
    assert [s.token_ids for s in result.sequences] == [hello[i : i + 3] for i in range(0, len(hello), 3)] + [[3, 4, 5], [6, 7]]
    assert result.sequences[-1].source == f"{path}:2"


def test_max_tokens_cuts_the_input(tokenizer, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps({"prompt_token_ids": list(range(10))}) for _ in range(3)))
    result = read_sequences([path, path], None, 320, seq_len=4, max_tokens=13)
    assert result.lengths == [4, 4, 2, 3] and result.tokens == 13 and result.truncated


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ('{"prompt_token_ids": [1, 400]}\n', "outside the vocabulary"),
        ('{"prompt_token_ids": [1, -1]}\n', "outside the vocabulary"),
        ('{"prompt_token_ids": []}\n', "non-empty list"),
        ('{"text": 5}\n', "non-empty string"),
        ("[1, 2]\n", "exactly one of"),
        ("{oops\n", "not valid JSON"),
    ],
)
def test_bad_inputs(tokenizer, tmp_path, content, message):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_sequences([path], tokenizer, 320, seq_len=8)


def test_text_needs_a_tokenizer_and_files_must_exist(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("some text")
    with pytest.raises(InputError, match="no tokenizer"):
        read_sequences([path], None, 320, seq_len=8)
    with pytest.raises(InputError, match="not found"):
        read_sequences([tmp_path / "missing"], None, 320, seq_len=8)
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\x00\x01")
    with pytest.raises(InputError, match="not UTF-8"):
        read_sequences([binary], None, 320, seq_len=8)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="no text found"):
        read_sequences([empty_dir], None, 320, seq_len=8)
    with pytest.raises(InputError, match="`seq_len`"):
        read_sequences([path], None, 320, seq_len=0)
