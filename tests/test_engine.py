"""The generation engine against transformers, and its own contracts (batch == single, stop strings, seeds)."""

import pytest
import torch

from dsv2cli.checkpoint.loader import load_hf_checkpoint
from dsv2cli.errors import InputError
from dsv2cli.inference.engine import Generation, GenerationOptions, GenerationRequest
from dsv2cli.inference.sampling import SamplingParams
from dsv2cli.inference.tokenizer import TextTokenizer
from tests.helpers import reference_model, save_reference, save_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gen")
    reference = reference_model(vocab_size=320)
    save_reference(reference, directory)
    save_tokenizer(directory)
    return reference, directory, load_hf_checkpoint(directory), TextTokenizer.from_directory(directory)


def _run(model, prompts, tokenizer=None, **options):
    requests = [GenerationRequest(p, None, i) for i, p in enumerate(prompts)]
    return Generation(model, requests, GenerationOptions(**options), tokenizer).run()


def test_greedy_tokens_and_logprobs_equal_transformers(checkpoint):
    reference, _, model, _ = checkpoint
    prompt = [0, 17, 99, 250, 3, 44, 61]
    (result,) = _run(model, [prompt], max_new_tokens=10)
    out = reference.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),  # token 0 is BOS here, not padding
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    expected_ids = out.sequences[0, len(prompt) :].tolist()
    expected_logprobs = [
        torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, expected_ids, strict=True)
    ]
    assert result.token_ids == expected_ids
    assert result.logprobs == pytest.approx(expected_logprobs, abs=1e-4)
    assert result.finish_reason == "length"


def test_batch_of_different_lengths_equals_each_alone(checkpoint):
    _, _, model, _ = checkpoint
    prompts = [[0, 5, 9], [0, 200, 201, 202, 203, 204, 205, 206, 207], [0, 42, 43, 44, 45]]
    batched = _run(model, prompts, max_new_tokens=8)
    for prompt, together in zip(prompts, batched, strict=True):
        (alone,) = _run(model, [prompt], max_new_tokens=8)
        assert together.token_ids == alone.token_ids
        assert together.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_seeded_sampling_is_reproducible_and_batch_independent(checkpoint):
    _, _, model, _ = checkpoint
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    a = _run(model, [[0, 5, 6], [0, 7]], max_new_tokens=12, sampling=params)
    b = _run(model, [[0, 5, 6], [0, 7]], max_new_tokens=12, sampling=params)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    other = _run(model, [[0, 5, 6]], max_new_tokens=12, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=4))
    assert other[0].token_ids != a[0].token_ids


def test_eos_stops_unless_ignored(checkpoint):
    _, _, model, _ = checkpoint
    (free,) = _run(model, [[0, 5, 6]], max_new_tokens=6)
    eos = free.token_ids[2]
    (stopped,) = _run(model, [[0, 5, 6]], max_new_tokens=6, eos_token_ids=(eos,))
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]
    assert stopped.finish_reason == "eos"
    (ignored,) = _run(model, [[0, 5, 6]], max_new_tokens=6, eos_token_ids=(eos,), ignore_eos=True)
    assert ignored.token_ids == free.token_ids and ignored.finish_reason == "length"


def test_stop_strings_cut_exactly(checkpoint):
    _, _, model, tokenizer = checkpoint
    prompt = tokenizer.encode("def add(a, b):")
    (free,) = _run(model, [prompt], tokenizer, max_new_tokens=24)
    text = free.text
    assert text and len(text) > 6
    stop = text[3:6]
    (cut,) = _run(model, [prompt], tokenizer, max_new_tokens=24, stop=(stop,))
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    streamed = "".join(
        e.text
        for e in Generation(model, [GenerationRequest(prompt)], GenerationOptions(max_new_tokens=24, stop=(stop,)), tokenizer)
    )
    assert streamed == cut.text


def test_streamed_text_equals_final_text(checkpoint):
    _, _, model, tokenizer = checkpoint
    generation = Generation(
        model, [GenerationRequest(tokenizer.encode("for item in"))], GenerationOptions(max_new_tokens=20), tokenizer
    )
    pieces = [event.text for event in generation]
    assert "".join(pieces) == generation.results[0].text == tokenizer.decode(generation.results[0].token_ids)


def test_context_limits(checkpoint):
    _, _, model, _ = checkpoint
    context = model.config.max_position_embeddings
    with pytest.raises(InputError, match="context"):
        _run(model, [[3] * context])
    (capped,) = _run(model, [[3] * (context - 4)], max_new_tokens=50)
    assert len(capped.token_ids) == 4 and capped.finish_reason == "length"
    with pytest.raises(InputError, match="vocabulary"):
        _run(model, [[5, 100000]])


def test_a_batch_whose_cache_does_not_fit_is_refused_before_the_cache_exists(checkpoint, monkeypatch):
    from dsv2cli.checkpoint import fit

    model = checkpoint[2]
    monkeypatch.setattr(fit, "available_memory", lambda device="cpu": fit.Available(40 << 20, "MemAvailable"))
    small = Generation(model, [GenerationRequest([1, 2, 3])], GenerationOptions(max_new_tokens=2))
    assert len(small.run()[0].token_ids) == 2  # a tiny cache fits in 40 MiB
    requests = [GenerationRequest(list(range(1, 60)), index=i) for i in range(64)]
    with pytest.raises(fit.InsufficientMemoryError) as caught:
        Generation(model, requests, GenerationOptions(max_new_tokens=4000))
    assert "64 prompt(s)" in caught.value.message and "available (MemAvailable)" in caught.value.message


def _loaded(checkpoint):
    from dsv2cli.inference.session import LoadedModel

    _, directory, model, tokenizer = checkpoint
    return LoadedModel("tiny", directory, model, tokenizer, torch.device("cpu"), torch.float32)


def test_batches_give_one_record_per_prompt_and_the_json_document(checkpoint):
    from dsv2cli.inference.generate import GenerateSettings, generate_batches

    loaded = _loaded(checkpoint)
    prompts = [[0, 17, 99], [0, 5], [0, 250, 3, 44]]
    options = GenerateSettings(max_new_tokens=3, batch_size=2).options(loaded, seed=None)
    batches, tokens = [], []
    requests = [GenerationRequest(p, None, i) for i, p in enumerate(prompts)]
    run = generate_batches(loaded, requests, options, 2, on_token=tokens.append, on_results=batches.append)
    assert [len(b) for b in batches] == [2, 1] and len(tokens) == run.tokens == 9
    alone = _run(loaded.model, [prompts[2]], max_new_tokens=3)[0]
    assert run.results[2].token_ids == alone.token_ids
    doc = run.to_json()
    assert doc["model"] == "tiny" and len(doc["results"]) == 3
    assert doc["cache"] == {"scheme": "mla-latent", "bytes": run.cache_bytes, "dtype": "float32"} and run.cache_bytes > 0


def test_settings_are_checked_before_loading_and_take_the_checkpoints_sampling():
    from dsv2cli.inference.generate import GenerateSettings, default_sampling

    with pytest.raises(InputError, match="`batch_size`"):
        GenerateSettings(batch_size=0)
    with pytest.raises(InputError, match="`seed`"):
        GenerateSettings(seed=-1)
    sampled = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    assert default_sampling(sampled) == SamplingParams(temperature=0.6, top_p=0.9)
    assert default_sampling({"temperature": 0.6}) == SamplingParams()  # no do_sample: greedy
    assert default_sampling(sampled, temperature=0.0, top_p=1.0).greedy
    penalised = {"repetition_penalty": 1.3}  # applied with or without do_sample, unless asked otherwise
    assert default_sampling(penalised) == SamplingParams(repetition_penalty=1.3)
    assert default_sampling(penalised, repetition_penalty=1.0) == SamplingParams()


def test_conversation_keeps_the_history(checkpoint):
    from dsv2cli.inference.conversation import Conversation

    loaded = _loaded(checkpoint)
    conversation = Conversation(loaded, GenerationOptions(max_new_tokens=2), system="be brief")
    answer = "".join(event.text for event in conversation.ask("hi"))
    conversation.answered(answer)
    assert [m["role"] for m in conversation.history] == ["system", "user", "assistant"]
    conversation.clear()
    assert conversation.history == [{"role": "system", "content": "be brief"}]
