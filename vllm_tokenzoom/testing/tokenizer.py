"""An offline byte-level BPE tokenizer with LLaVA-OneVision's (Qwen2's) special tokens.

It is trained on a corpus generated here from a seed, so the same seed gives the same
tokenizer on every machine and Python version.
"""
from __future__ import annotations

import random

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# Qwen2-style template over OpenAI content lists: images, then videos, then text (as llava-onevision-hf)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for c in message['content'] %}{% if c['type'] in ('image', 'image_url') %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] in ('video', 'video_url') %}{{ '<video>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = {
    "colour": "red green blue yellow white black orange purple pink brown grey cyan".split(),
    "shape": "square circle triangle ball box star line cube disk ring".split(),
    "verb": "moves appears disappears stops turns jumps falls rises waits spins grows shrinks".split(),
    "where": "left right up down centre corner top bottom middle edge".split(),
    "when": "first then later finally before after while during".split(),
    "number": "zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 12 16 32".split(),
    "question": "What Which How many When Where Who Why Describe Count Name".split(),
    "filler": "the a an of in on at to from and is are was it this that video frame scene object".split(),
}


_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "ch", "sh", "qu", "x"]


def corpus(seed: int, num_sentences: int = 20000) -> list[str]:
    """Sentences of task words mixed with pseudo-words (so BPE fills a few thousand ids)."""
    rng = random.Random(seed)
    pseudo = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(3000)]
    kinds = [*_WORDS, "pseudo"]
    lines = []
    for _ in range(num_sentences):
        words = [rng.choice(pseudo if k == "pseudo" else _WORDS[k]) for k in rng.choices(kinds, k=rng.randint(3, 12))]
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":"]))
    return lines


def build_tokenizer(seed: int = 0, vocab_size: int = 4096):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIALS), min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(corpus(seed), trainer)
    tok.add_special_tokens(SPECIALS)  # appended at the end, as in Qwen2
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        model_max_length=32768, padding_side="left", clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
