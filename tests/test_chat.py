import pytest

from dsv2cli.errors import InputError
from dsv2cli.inference.chat import DEEPSEEK_V2_TEMPLATE, render_chat, validate_messages

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def test_deepseek_v2_template_matches_spec_example():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]
    rendered = render_chat(DEEPSEEK_V2_TEMPLATE, messages, BOS, EOS)
    assert rendered == f"{BOS}Be brief.\n\nUser: u1\n\nAssistant: a1{EOS}User: u2\n\nAssistant:"


def test_without_generation_prompt():
    rendered = render_chat(DEEPSEEK_V2_TEMPLATE, [{"role": "user", "content": "hi"}], BOS, EOS, add_generation_prompt=False)
    assert rendered == f"{BOS}User: hi\n\n"


def test_template_is_sandboxed():
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InputError, match="chat template"):
        render_chat(hostile, [{"role": "user", "content": "x"}], BOS, EOS)
    mutating = "{% set x = [] %}{{ x.append(1) }}"
    with pytest.raises(InputError):
        render_chat(mutating, [{"role": "user", "content": "x"}], BOS, EOS)


def test_raise_exception_in_template_is_an_input_error():
    with pytest.raises(InputError, match="no system"):
        render_chat("{{ raise_exception('no system') }}", [{"role": "user", "content": "x"}], BOS, EOS)


def test_message_validation():
    with pytest.raises(InputError):
        validate_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(InputError):
        validate_messages([])
