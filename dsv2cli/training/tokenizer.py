"""Training a byte-level BPE tokenizer from scratch, saved in the Hugging Face layout (reading one back is
``dsv2cli.inference.tokenizer``'s job).

Special tokens use DeepSeek-V2's spellings (spec §7) at ids 0 and 1; ``tokenizer.json`` prepends BOS
through its post-processor like the released tokenizers, and ``tokenizer_config.json`` carries the
DeepSeek-V2 chat template, so ``dsv2 generate --chat`` and transformers' ``AutoTokenizer`` both work.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dsv2cli.errors import InputError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

# DeepSeek-V2-Chat's template (spec §7).
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

MIN_VOCAB = 256 + 2  # every byte plus the two special tokens


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with ``vocab_size`` entries (BOS = 0, EOS = 1, then the 256 bytes, then merges)."""
    if vocab_size < MIN_VOCAB:
        raise InputError(f"`vocab_size` must be at least {MIN_VOCAB} (256 bytes + BOS + EOS), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # Whitespace runs, words and punctuation runs are separate pieces (no GPT-2 style " word" tokens), so a
    # prompt ending in a space ("def ") is tokenised exactly as it appears inside training text.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s+|\w+|[^\s\w]+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: Path, model_max_length: int) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (BOS/EOS, add_bos_token, chat template)."""
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
