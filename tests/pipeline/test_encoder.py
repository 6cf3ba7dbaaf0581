"""pipeline/encoder.py: its shortcuts give exactly the ids and word starts of a plain encode_batch."""
from __future__ import annotations

import gzip
import json
import string
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

from maskstream.pipeline.encoder import (
    AsciiPath,
    Encoder,
    UnicodePath,
    space_out,
    word_start_table,
    word_starts_from_ids,
)
from maskstream.pipeline.tokenizer import convert_gpt2, load_tokenizer

TRICKY = [
    "4 and 4 1\x02 per cent bonds",            # a control character: removed by clean_text, joins 1 and per
    "tab\tnew\nline\rcr form\x0cfeed\x0bvt \x7fdel \x00nul \x1fus end",
    "[MASK] is special, [mask] and [Mask] are not; [CLS][SEP]",
    "THE People OF The UNITED States!!! e.g. U.S.A., 1,000.50 $5 #hash ##piece @at ~tilde `tick`",
    "Ünïcödé café naïve 中文字符 résumé",        # not ASCII: the full path
    "<s>hello</s> <S>HELLO</S> <mask> <MASK> <pad>",
    "", " ", "\x01\x02", "a" * 300, "x" + "\x7f" * 5 + "y",
]


# not ASCII: what the Unicode path must take exactly or leave to the full path
UNICODE_EDGES = [
    "中文，标点。「引号」！（括号）中文字符", "\U00020000\U0002a6d6 extension B, \u3007 \uf900 compatibility",
    "Ünïcödé CAFÉ naïve résumé e\u0301 a\u0316\u0301 a\u0301\u0316 o\u0308\u0304",   # combining marks, any order
    "ΣΊΣΥΦΟΣ ὈΔΥΣΣΕΎΣ ς σ", "İstanbul ıi ǅ ß ẞ ﬁ ﬀ", "한국어 텍스트 ㄱ", "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ　１２３！",
    "nbsp\u00a0here\u2003em\u3000ideographic\u2028ls", "zw\u200bsp\u200dzwj\ufeffbom\ufffdrepl\u00adshy",
    "emoji 😀👍🏽 👨‍👩‍👧 ✓ ☃", "ﷺ \U0001d165\U0001d166 \u0f71\u0f72", "中文[MASK]中文 ［ＭＡＳＫ］ [mask]",
    "\u0600\u0601 arabic تجربة עברית", "ȺȾ ⱥ Ω K Å",
]


def reference(tok, texts):
    """What a plain encode_batch gives: ids and word starts from word ids."""
    return [(np.asarray(e.ids, dtype=np.uint32), word_starts_from_ids(e.word_ids))
            for e in tok.encode_batch(texts, add_special_tokens=False)]


def assert_same(encoder, tok, texts):
    got, want = encoder.encode(texts), reference(tok, texts)
    assert len(got) == len(want)
    for i, ((a, sa), (b, sb)) in enumerate(zip(got, want, strict=False)):
        assert np.array_equal(a, b), f"ids differ for text {i}: {texts[i][:60]!r}"
        assert np.array_equal(sa, sb), f"word starts differ for text {i}: {texts[i][:60]!r}"


@pytest.fixture(scope="module")
def bert(bert_json):
    return load_tokenizer(str(bert_json))[0]


@pytest.fixture(scope="module")
def gpt2(data_dir):
    d = data_dir / "tokenizers"
    return convert_gpt2(str(d / "gpt2-vocab.json"), str(d / "gpt2-merges.txt"))


@pytest.mark.slow
def test_bert_on_the_whole_sotu_corpus_gives_the_plain_ids_mostly_through_the_ascii_path(bert, sotu_texts):
    encoder = Encoder(bert)
    assert encoder.ascii is not None and encoder.table is not None
    assert sum(encoder.ascii.take(t) is not None for t in sotu_texts) >= 200   # the shortcut is really taken
    assert_same(encoder, bert, sotu_texts)


@pytest.fixture(scope="module")
def zh_texts(data_dir):
    with gzip.open(data_dir / "debian-reference-zh.jsonl.gz", "rt") as f:
        return [json.loads(line)["text"] for line in f]


def test_bert_on_chinese_prose_and_tricky_strings(bert, zh_texts):
    encoder = Encoder(bert)
    assert encoder.unicode is not None and all(encoder.take(t) is not None for t in zh_texts)  # all taken
    assert_same(encoder, bert, zh_texts + TRICKY + UNICODE_EDGES)
    assert encoder.take("中文[MASK]") is None and encoder.take("lone \ud800") is None
    path = Encoder(bert).ascii
    assert path.take("[MASK] here") is None and path.take("[Mask] HERE") == " [ mask ]  here"  # only "[MASK]"


@pytest.mark.slow
def test_byte_level_bpe_with_and_without_a_normalizer(gpt2, sotu_texts):
    assert_same(Encoder(gpt2), gpt2, sotu_texts[:40] + TRICKY)      # no normalizer: nothing to skip
    nfc = Tokenizer.from_str(gpt2.to_str())
    nfc.normalizer = normalizers.NFC()                                # what `tokenizer train --kind bpe` sets
    encoder = Encoder(nfc)
    assert encoder.ascii is not None and encoder.table is None
    assert_same(encoder, nfc, sotu_texts[:40] + TRICKY)


def test_a_lowercasing_normalizer_never_makes_an_added_token_out_of_raw_text():
    tok = Tokenizer(models.WordLevel({"<s>": 0, "<": 1, "s": 2, ">": 3, "hi": 4, "[UNK]": 5}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(["<s>"])
    texts = ["hi <S> hi", "HI <s>", "hi"]
    encoder = Encoder(tok)
    assert encoder.ascii is not None and [encoder.ascii.take(t) for t in texts] == [None, None, "hi"]
    assert_same(encoder, tok, texts)


@pytest.mark.parametrize("normalizer", [normalizers.Replace("a", "bb"), normalizers.Strip(),
                                        normalizers.Sequence([normalizers.Lowercase(), normalizers.Prepend("_")])])
def test_normalizers_that_are_not_per_character_keep_the_full_path(bert, sotu_texts, normalizer):
    tok = Tokenizer.from_str(bert.to_str())
    tok.normalizer = normalizer
    encoder = Encoder(tok)
    assert encoder.ascii is None
    assert_same(encoder, tok, sotu_texts[:3] + TRICKY)


def test_ascii_rules_are_read_off_the_normalizer_and_pre_tokenizer(bert):
    path = AsciiPath.build(bert)
    assert set(path.delete) == set(range(0, 9)) | {0x0B, 0x0C} | set(range(0x0E, 0x20)) | {0x7F}
    assert path.normalize("A\tB\x02c") == "a bc"
    assert {chr(c) for c in np.flatnonzero(path.isolate)} == set(string.punctuation)
    assert space_out("u.s.a., ok", path.isolate) == "u . s . a .  ,  ok"
    assert word_start_table(bert)[bert.token_to_id("##s")] == 0 and word_start_table(bert)[bert.token_to_id("the")]


def test_chinese_from_several_threads_at_once_while_characters_are_learned(bert, zh_texts):
    encoder = Encoder(bert)
    parts = [zh_texts[i::4] + UNICODE_EDGES for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(encoder.encode, parts))
    for part, out in zip(parts, got, strict=True):
        for (a, sa), (b, sb) in zip(out, reference(bert, part), strict=True):
            assert np.array_equal(a, b) and np.array_equal(sa, sb)


@pytest.mark.parametrize("normalizer", [
    normalizers.BertNormalizer(lowercase=False, strip_accents=False),      # a cased BERT: accents kept
    normalizers.Lowercase(),                                               # "İ" -> "i" + a combining dot
    normalizers.Sequence([normalizers.NFKD(), normalizers.Lowercase()]),   # "ﷺ" -> 18 characters
])
def test_characters_the_unicode_path_cannot_prove_take_the_full_path(bert, zh_texts, normalizer):
    tok = Tokenizer.from_str(bert.to_str())
    tok.normalizer = normalizer
    encoder = Encoder(tok)
    assert encoder.unicode is not None
    assert_same(encoder, tok, zh_texts[:2] + UNICODE_EDGES + TRICKY)
    assert encoder.take("e\u0301" if "Bert" in repr(normalizer) else "İ ﷺ") is None
    assert encoder.take("中文") is not None


def test_no_unicode_path_where_the_rules_do_not_act_per_character(bert, gpt2, zh_texts):
    nfc = Tokenizer.from_str(bert.to_str())
    nfc.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])   # composes pairs
    assert UnicodePath.build(nfc, AsciiPath.build(nfc)) is None and Encoder(nfc).ascii is not None
    assert_same(Encoder(nfc), nfc, zh_texts[:1] + UNICODE_EDGES)
    assert Encoder(gpt2).unicode is None                           # byte-level BPE: no BertPreTokenizer
    assert_same(Encoder(gpt2), gpt2, zh_texts[:1] + UNICODE_EDGES)


def test_an_added_token_the_normalizer_makes_out_of_other_text_takes_the_full_path(bert):
    tok = Tokenizer.from_str(bert.to_str())
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tok.add_tokens([AddedToken("élan", normalized=True)])              # matched in the normalized text
    texts = ["ÉLAN 中文", "Élan", "élan", "elan 中文", "中文 ÉLA N"]
    encoder = Encoder(tok)
    assert [encoder.take(t) is None for t in texts] == [True, True, True, False, False]
    assert_same(encoder, tok, texts)
