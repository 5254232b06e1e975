"""The embedded CLIP's tokenizer: a lower-casing byte-level BPE trained on the pretraining captions and everyday words.

Byte level means any string (``"giraffe"``, emoji, accents) encodes without an unknown token: class names that the
continual learner meets later must be expressible.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .data import CAPTION_TEMPLATES, PRETRAINING_CLASSES, captions_for

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|startoftext|>", "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2 (eos must not be 2: legacy CLIP pooling)
TOKENIZER_VOCAB_SIZE = 1024
MAX_TEXT_LENGTH = 32


def english_words() -> list[str]:
    """The everyday words of the package data file `words.txt`, in order (they give later class names, such as
    the animals', sensible sub-word pieces; the byte-level model encodes any string regardless)."""
    text = resources.files(__package__).joinpath("words.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def words_digest() -> str:
    """A short hash of the word list: part of the pretraining recipe, since the words shape the vocabulary."""
    return hashlib.sha256("\n".join(english_words()).encode()).hexdigest()[:16]


def _tokenizer_corpus() -> list[str]:
    """Captions of every pretraining class (repeated: they dominate the merges) plus everyday words."""
    captions = [c for t in CAPTION_TEMPLATES for c in captions_for(PRETRAINING_CLASSES, t)]
    return captions * 4 + english_words()


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A lower-casing byte-level BPE tokenizer with CLIP-like special tokens (deterministic: trained from scratch
    on the same corpus every time)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, bos), (EOS_TOKEN, eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_TEXT_LENGTH,
    )
