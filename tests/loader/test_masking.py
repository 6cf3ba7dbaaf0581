"""The masking rule on real text: rates, 80/10/10, specials, whole words, spans, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import sotu_texts
from tokenizers import Tokenizer
from tokenizers.implementations import ByteLevelBPETokenizer

from maskstream.loader.masking import (
    IGNORE_INDEX,
    MaskingConfig,
    Vocab,
    keyed_bits,
    mask_batch,
    select,
    sequence_keys,
    static_copy,
    static_masks,
)

SEQ_LEN = 128
MIN_TOKENS = 1_000_000


def _pack(encodings, cls_id, sep_id):
    """Concatenate documents and cut into [CLS] x(L-2) [SEP] rows; word starts from the tokenizer's word ids."""
    ids, starts = [], []
    for enc in encodings:
        prev = None
        for tok, word in zip(enc.ids, enc.word_ids, strict=False):
            ids.append(tok)
            starts.append(word is None or word != prev)
            prev = word
    body = SEQ_LEN - 2
    n = len(ids) // body
    ids = np.asarray(ids[: n * body]).reshape(n, body)
    starts = np.asarray(starts[: n * body]).reshape(n, body)
    tokens = np.concatenate([np.full((n, 1), cls_id), ids, np.full((n, 1), sep_id)], axis=1)
    word_starts = np.concatenate([np.ones((n, 1), bool), starts, np.ones((n, 1), bool)], axis=1)
    return torch.from_numpy(tokens), torch.from_numpy(word_starts)


@pytest.fixture(scope="module")
def bert_batch(bert_tokenizer_file):
    tok = Tokenizer.from_file(str(bert_tokenizer_file))
    tok.no_truncation()
    encs = tok.encode_batch(sotu_texts(max_chars=7_000_000), add_special_tokens=False)
    tokens, ws = _pack(encs, 101, 102)
    vocab = Vocab(size=tok.get_vocab_size(), pad_id=0, mask_id=103, special_ids=(0, 100, 101, 102, 103))
    return tokens, ws, vocab


@pytest.fixture(scope="module")
def bpe_batch(data_dir):
    tok = ByteLevelBPETokenizer(str(data_dir / "tokenizers" / "gpt2-vocab.json"),
                                str(data_dir / "tokenizers" / "gpt2-merges.txt"))
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<mask>"])
    specials = tuple(tok.token_to_id(t) for t in ["<s>", "<pad>", "</s>", "<mask>", "<|endoftext|>"])
    encs = tok.encode_batch(sotu_texts(max_chars=7_000_000))
    tokens, ws = _pack(encs, tok.token_to_id("<s>"), tok.token_to_id("</s>"))
    vocab = Vocab(size=tok.get_vocab_size(), pad_id=tok.token_to_id("<pad>"), mask_id=tok.token_to_id("<mask>"),
                  special_ids=specials)
    return tokens, ws, vocab


def _uids(n):
    return torch.from_numpy(np.random.default_rng(7).integers(0, 2**63, n, dtype=np.uint64).view(np.int64))


def _lengths(tokens):
    # a tenth of the rows are shorter, with padding behind, so padding is exercised too
    lengths = torch.full((tokens.shape[0],), SEQ_LEN)
    lengths[::10] = 70
    return lengths


def _check_stats(tokens, ws, vocab, config):
    assert tokens.numel() >= MIN_TOKENS
    lengths = _lengths(tokens)
    padded = tokens.clone()
    padded[torch.arange(SEQ_LEN)[None, :] >= lengths[:, None]] = vocab.pad_id
    inputs, labels = mask_batch(padded, ws, lengths, _uids(len(tokens)), seed=11, epoch=2, config=config,
                                vocab=vocab)
    selected = labels != IGNORE_INDEX
    special = torch.isin(padded, torch.tensor(vocab.special_ids))
    real = torch.arange(SEQ_LEN)[None, :] < lengths[:, None]
    eligible = real & ~special
    assert not (selected & ~eligible).any(), "a special token or padding was selected"
    rate = selected.sum().item() / eligible.sum().item()
    assert abs(rate - config.mask_prob) < 0.005, f"selection rate {rate:.4f}"
    assert torch.equal(labels[selected], padded[selected])
    n = selected.sum().item()
    masked = (inputs == vocab.mask_id) & selected
    randomized = (inputs != padded) & selected & ~masked
    kept = (inputs == padded) & selected
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(randomized.sum().item() / n - 0.1) < 0.01
    assert abs(kept.sum().item() / n - 0.1) < 0.01
    assert not torch.isin(inputs[randomized], torch.tensor(vocab.special_ids)).any()
    assert torch.equal(inputs[~selected], padded[~selected]), "an unselected position changed"
    return selected, eligible


def _assert_whole_words(selected, ws, eligible):
    # every piece of a word carries the flag of the word's first piece
    word_id = torch.cumsum(ws.to(torch.int64), dim=1)
    for row in range(0, selected.shape[0], 97):
        for w in torch.unique(word_id[row][eligible[row]]):
            flags = selected[row][(word_id[row] == w) & eligible[row]]
            assert flags.all() or not flags.any(), f"word {int(w)} of row {row} split: {flags.tolist()}"


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["token", "word", "span"])
@pytest.mark.parametrize("count", ["exact", "bernoulli"])
def test_statistics_on_a_million_wordpiece_tokens(bert_batch, selection, count):
    tokens, ws, vocab = bert_batch
    selected, eligible = _check_stats(tokens, ws, vocab, MaskingConfig(selection=selection, count=count))
    if selection != "token":
        _assert_whole_words(selected, ws, eligible)


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["word", "span"])
def test_whole_words_with_byte_level_bpe(bpe_batch, selection):
    tokens, ws, vocab = bpe_batch
    selected, eligible = _check_stats(tokens, ws, vocab, MaskingConfig(selection=selection))
    _assert_whole_words(selected, ws, eligible)


@pytest.mark.slow
def test_exact_count_is_round_p_n_per_sequence(bert_batch):
    tokens, ws, vocab = bert_batch
    tokens, ws = tokens[:2000], ws[:2000]
    lengths = torch.full((len(tokens),), SEQ_LEN)
    _, labels = mask_batch(tokens, ws, lengths, _uids(len(tokens)), seed=0, epoch=0, config=MaskingConfig(),
                           vocab=vocab)
    n = (~torch.isin(tokens, torch.tensor(vocab.special_ids))).sum(1)
    assert torch.equal((labels != IGNORE_INDEX).sum(1), torch.floor(n * 0.15 + 0.5).to(torch.int64))


def test_span_lengths_are_clipped_geometric():
    # every position a word, no specials: the spans are min(Geometric(p), span_max) words long
    config = MaskingConfig(selection="span", span_p=0.2, span_max=10)
    B, L = 4000, 256
    tokens = torch.full((B, L), 5)
    vocab = Vocab(size=100, pad_id=0, mask_id=1, special_ids=(0, 1))
    keys = sequence_keys(_uids(B), seed=3, epoch=0)
    from maskstream.loader.masking import _span_units
    eligible = torch.ones((B, L), dtype=torch.bool)
    starts = _span_units(eligible, eligible, keys, config)
    lengths = []
    for row in starts[:, :].numpy():
        idx = np.flatnonzero(row)
        lengths.append(np.diff(idx))  # the last span of a row is cut by the row's end: left out
    lengths = np.concatenate(lengths)
    pmf = np.bincount(lengths, minlength=11)[1:11] / len(lengths)
    want = np.array([0.2 * 0.8 ** (k - 1) for k in range(1, 10)] + [0.8 ** 9])
    assert np.abs(pmf - want).max() < 0.01, (pmf.round(3), want.round(3))
    assert lengths.max() == 10
    _ = vocab, tokens


@pytest.mark.slow
def test_mask_depends_only_on_seed_epoch_uid_not_batch(bert_batch):
    tokens, ws, vocab = bert_batch
    tokens, ws = tokens[:300], ws[:300]
    uids, lengths = _uids(300), torch.full((300,), SEQ_LEN)
    for config in (MaskingConfig(), MaskingConfig(selection="span", count="bernoulli")):
        full = mask_batch(tokens, ws, lengths, uids, seed=5, epoch=1, config=config, vocab=vocab)
        perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:77]
        part = mask_batch(tokens[perm], ws[perm], lengths[perm], uids[perm], seed=5, epoch=1, config=config,
                          vocab=vocab)
        assert torch.equal(part[0], full[0][perm]) and torch.equal(part[1], full[1][perm])
        other_epoch = mask_batch(tokens, ws, lengths, uids, seed=5, epoch=2, config=config, vocab=vocab)
        other_seed = mask_batch(tokens, ws, lengths, uids, seed=6, epoch=1, config=config, vocab=vocab)
        assert not torch.equal(other_epoch[1], full[1]) and not torch.equal(other_seed[1], full[1])


@pytest.mark.slow
def test_static_copies_are_the_dynamic_masks_of_epochs_0_to_k(bert_batch):
    tokens, ws, vocab = bert_batch
    tokens, ws, uids, lengths = tokens[:64], ws[:64], _uids(64), torch.full((64,), SEQ_LEN)
    selected, inputs = static_masks(tokens, ws, lengths, uids, seed=9, copies=3, config=MaskingConfig(),
                                    vocab=vocab)
    for epoch in range(3):
        want = mask_batch(tokens, ws, lengths, uids, seed=9, epoch=epoch, config=MaskingConfig(), vocab=vocab)
        got = static_copy(tokens, selected[:, epoch], inputs[:, epoch])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_generator_bits_are_frozen():
    # The rule is part of the data contract: static datasets and resumed runs depend on these exact bits.
    uids = torch.tensor([0, 1, -1, 2**40 + 7])
    keys = sequence_keys(uids, seed=0, epoch=0)
    assert keys.tolist() == [2906104390, 648850940, 2787647713, 4052166431]
    assert keyed_bits(keys, 4, 0)[0].tolist() == [2939118465, 2670290585, 1011459200, 3007358595]
    assert sequence_keys(uids, seed=12345, epoch=3).tolist() == [3717795503, 2251682105, 3083926407, 2641746262]


def test_bad_config_and_out_of_vocab_ids_are_refused():
    with pytest.raises(ValueError, match="selection"):
        MaskingConfig(selection="sentence")
    with pytest.raises(ValueError, match="mask_prob"):
        MaskingConfig(mask_prob=1.5)
    vocab = Vocab(size=10, pad_id=0, mask_id=1, special_ids=(0, 1))
    with pytest.raises(ValueError, match="outside"):
        select(torch.tensor([[3, 12]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([2]),
               torch.tensor([1]), config=MaskingConfig(), vocab=vocab)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.parametrize("selection", ["token", "word", "span", "pmi"])
@pytest.mark.parametrize("count", ["exact", "bernoulli"])
def test_cpu_and_gpu_masks_are_bit_identical(bert_batch, selection, count):
    tokens, ws, vocab = bert_batch
    tokens, ws, uids, lengths = tokens[:4096], ws[:4096], _uids(4096), _lengths(tokens[:4096])
    config = MaskingConfig(selection=selection, count=count)
    cpu = mask_batch(tokens, ws, lengths, uids, seed=1, epoch=4, config=config, vocab=vocab)
    gpu = mask_batch(tokens.cuda(), ws.cuda(), lengths.cuda(), uids.cuda(), seed=1, epoch=4, config=config,
                     vocab=vocab)
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


@pytest.mark.slow
def test_dense_and_sparse_corruption_paths_agree(bert_batch):
    # the GPU takes the dense path, the CPU the sparse one: they must give the same inputs
    from maskstream.loader.masking import _corrupt
    tokens, ws, vocab = bert_batch
    tokens, ws, uids, lengths = tokens[:500], ws[:500], _uids(500), torch.full((500,), SEQ_LEN)
    keys = sequence_keys(uids, seed=2, epoch=7)
    selected = select(tokens, ws, lengths, keys, config=MaskingConfig(), vocab=vocab)
    dense = _corrupt(tokens, selected, keys, config=MaskingConfig(), vocab=vocab, dense=True)
    sparse = _corrupt(tokens, selected, keys, config=MaskingConfig(), vocab=vocab, dense=False)
    assert torch.equal(dense, sparse)
