"""Trained tokenizers behave like the HF ones and reload with AutoTokenizer."""

from transformers import AutoTokenizer

from llmctl.core.tokenizer import train_tokenizer

TEXTS = ["The central bank raised interest rates.", "Shares fell sharply after the warning."] * 50


def test_wordpiece_for_bert_adds_cls_sep_and_reloads(tmp_path):
    tok = train_tokenizer(TEXTS, family="bert", vocab_size=200, lowercase=True, max_len=64, cache_root=tmp_path, data_fp="t")
    enc = tok("The Bank", "shares")
    assert tok.convert_ids_to_tokens(enc["input_ids"])[0] == "[CLS]"
    assert enc["token_type_ids"][-1] == 1 and tok.mask_token == "[MASK]"
    tok.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert again("the bank")["input_ids"] == tok("the bank")["input_ids"]
    assert again.decode(again("the bank", add_special_tokens=False)["input_ids"]) == "the bank"


def test_byte_level_bpe_for_gpt_roundtrips_any_text(tmp_path):
    tok = train_tokenizer(TEXTS, family="gpt2", vocab_size=300, lowercase=False, max_len=64, cache_root=tmp_path, data_fp="t")
    text = "Zürich's ☃ rates rose 3.5%"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: nothing is unknown
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id


def test_trained_tokenizer_is_cached_by_corpus(tmp_path):
    train_tokenizer(TEXTS, family="bert", vocab_size=200, lowercase=True, max_len=64, cache_root=tmp_path, data_fp="a")
    train_tokenizer(TEXTS, family="bert", vocab_size=200, lowercase=True, max_len=64, cache_root=tmp_path, data_fp="a")
    train_tokenizer(TEXTS, family="bert", vocab_size=200, lowercase=True, max_len=64, cache_root=tmp_path, data_fp="b")
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2
