"""Tokenizers: reuse a checkpoint's, or train one on the corpus with `tokenizers`.

BERT-family models get an uncased WordPiece tokenizer with [CLS]/[SEP] templates; GPT-family
models a byte-level BPE with <|endoftext|>. Trained tokenizers are cached under
`<output_root>/.cache/tokenizers/<key>` (key: corpus fingerprint, kind, vocabulary size) and are
saved with every checkpoint, so `AutoTokenizer.from_pretrained(<checkpoint>)` just works.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

from llmctl.core.errors import LlmctlError

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EOT = "<|endoftext|>"


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise LlmctlError(f"no usable tokenizer in {folder} ({str(e).splitlines()[0][:120]}); set tokenizer.from=<folder or reference>") from None


def train_tokenizer(texts, *, family: str, vocab_size: int, lowercase: bool, max_len: int, cache_root: Path, data_fp: str):
    """Train (or fetch from cache) a tokenizer for `family` on an iterable of texts."""
    kind = "wordpiece" if family == "bert" else "bpe"
    key = hashlib.sha256(json.dumps([data_fp, kind, vocab_size, lowercase, max_len]).encode()).hexdigest()[:20]
    cache = Path(cache_root) / "tokenizers" / key
    if (cache / "tokenizer.json").is_file():
        return load_tokenizer(cache)
    fast = _train_wordpiece(texts, vocab_size, lowercase) if kind == "wordpiece" else _train_bpe(texts, vocab_size)
    fast.model_max_length = max_len
    tmp = cache.with_name(f".{key}.{uuid.uuid4().hex}")
    fast.save_pretrained(str(tmp))
    try:
        tmp.rename(cache)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(cache)


def _train_wordpiece(texts, vocab_size: int, lowercase: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=WORDPIECE_SPECIALS, show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])  # BERT uses segments


def _train_bpe(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT)
