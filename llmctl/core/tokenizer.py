"""Tokenizers: reuse a checkpoint's, or train one on the corpus with `tokenizers`.

BERT-family models get an uncased WordPiece tokenizer with [CLS]/[SEP] templates; GPT-family
models a byte-level BPE with <|endoftext|> (end of text) and a separate <|pad|>: with pad = eos,
collators and loss masks that drop padding would drop every end-of-text too. Trained tokenizers
are cached under `<output_root>/.cache/tokenizers/<key>` (key: format version, corpus
fingerprint, kind, vocabulary size, casing) and are saved with every checkpoint, so
`AutoTokenizer.from_pretrained(<checkpoint>)` just works.

Training is reproducible: the same corpus and settings give the same tokenizer.json, byte for
byte (see `_train_wordpiece` for how WordPiece is made so), and a cache hit says which tokenizer
(its hash) it reuses.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llmctl.core.errors import LlmctlError
from llmctl.core.files import atomic_path

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EOT = "<|endoftext|>"
PAD = "<|pad|>"
FORMAT_VERSION = 2  # bump when trained tokenizers change (2: reproducible WordPiece, a BPE pad distinct from EOS)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise LlmctlError(
            f"no usable tokenizer in {folder} ({str(e).splitlines()[0][:120]}); set tokenizer.from=<folder or "
            "reference>"
        ) from None


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normalizer, templates); for a
    slow (Python) tokenizer, of its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    else:  # truncation / padding are call-time state (set by the last call with truncation=True), not the tokenizer
        text = json.dumps(
            {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")},
            sort_keys=True,
        )
    return hashlib.sha256(text.encode()).hexdigest()


def train_tokenizer(
    texts, *, family: str, vocab_size: int, lowercase: bool, max_len: int, cache_root: Path, data_fp: str, say=None
):
    """Train (or fetch from cache) a tokenizer for `family` on an iterable of texts.
    `say(text)` is told which tokenizer was trained or reused (its hash)."""
    kind = "wordpiece" if family == "bert" else "bpe"
    key = hashlib.sha256(
        json.dumps([FORMAT_VERSION, data_fp, kind, vocab_size, lowercase, max_len]).encode()
    ).hexdigest()[:20]
    cache = Path(cache_root) / "tokenizers" / key
    if (cache / "tokenizer.json").is_file():
        tok = load_tokenizer(cache)
        if say:
            say(f"tokenizer {tokenizer_hash(tok)[:12]} ({kind}, {len(tok)} tokens) reused from {cache}")
        return tok
    fast = _train_wordpiece(texts, vocab_size, lowercase) if kind == "wordpiece" else _train_bpe(texts, vocab_size)
    fast.model_max_length = max_len
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache, keep_existing=True, what="the tokenizer cache") as tmp:  # another process may be first
        fast.save_pretrained(str(tmp))
    tok = load_tokenizer(cache)
    if say:
        say(
            f"tokenizer {tokenizer_hash(tok)[:12]} ({kind}, {len(tok)} tokens) trained on the corpus, cached in {cache}"
        )
    return tok


def _train_wordpiece(texts, vocab_size: int, lowercase: bool):
    """An uncased WordPiece with BERT's normalizer, pre-tokenizer and [CLS]/[SEP] templates.

    Trained as `tokenizers`' WordPieceTrainer does (a BPE over words whose non-initial characters
    are distinct "##" symbols), but reproducibly: WordPieceTrainer numbers the "##" symbols in
    hash-map order, and those numbers break ties between equally frequent merges, so the same
    corpus gave a different vocabulary from run to run (huggingface/tokenizers#1794). Here each
    continuation character is spelled as its own private-use character, sorted, so the BPE
    trainer (deterministic) sees a fixed alphabet; the pieces are then spelled back with "##"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = [[w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))] for t in texts]
    used = {c for ws in words for w in ws for c in w}
    free = (chr(cp) for cp in range(0xF0000, 0x10FFFE) if chr(cp) not in used)  # private-use planes
    spell = {c: next(free) for c in sorted({c for ws in words for w in ws for c in w[1:]})}
    unspell = {v: k for k, v in spell.items()}
    table = str.maketrans(spell)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator(
        (" ".join(w[0] + w[1:].translate(table) for w in ws) for ws in words),
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=WORDPIECE_SPECIALS, show_progress=False),
    )
    pieces = set()
    for t in bpe.get_vocab():
        if t not in WORDPIECE_SPECIALS:
            rest = "".join(unspell[c] for c in t[1:])
            pieces.add("##" + unspell[t[0]] + rest if t[0] in unspell else t[0] + rest)
    order = WORDPIECE_SPECIALS + sorted(pieces)  # ids carry no meaning in WordPiece: number them canonically

    tok = Tokenizer(
        models.WordPiece(vocab={t: i for i, t in enumerate(order)}, unk_token="[UNK]", continuing_subword_prefix="##")
    )
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )  # BERT uses segments


def _train_bpe(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=PAD)
