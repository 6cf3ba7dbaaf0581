"""The masking rule (DESIGN contract 3): pure tensor functions, keyed randomness, any device.

The mask of a sequence is a pure function of (seed, epoch, uid, tokens, word starts, config). Randomness comes
from a counter-based generator: a keyed 32-bit integer hash of (sequence key, position, stream), computed with
int64 tensor ops whose products never overflow, so CPU and GPU give the same bits for any batch composition.
No global RNG, no I/O, no Python loop over sequences.
"""
from __future__ import annotations

import torch
from torch import Tensor

from maskstream.loader.maskconfig import COUNTS, IGNORE_INDEX, SELECTIONS, MaskingConfig, Vocab  # noqa: F401 (re-exported)

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # offsets keep 0 (a fixed point of the hash) out of every input
_MIX = 0x45D9F3B  # < 2**31: a product with a 32-bit value stays below 2**63, so int64 never overflows


# ---- the counter-based generator --------------------------------------------------------------------------

def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash (bijective on [0, 2**32)), computed in int64 without overflow; x is not changed."""
    x = x & _M32
    x ^= x >> 16
    x *= _MIX
    x &= _M32
    x ^= x >> 16
    x *= _MIX
    x &= _M32
    x ^= x >> 16
    return x


def _mix_int(x: int) -> int:
    """_mix for a Python int, bit for bit."""
    x &= _M32
    x = (((x >> 16) ^ x) * _MIX) & _M32
    x = (((x >> 16) ^ x) * _MIX) & _M32
    return (x >> 16) ^ x


def sequence_keys(uids: Tensor, *, seed: int, epoch: int | Tensor) -> Tensor:
    """(B,) int64 in [0, 2**32): the key of each sequence for this (seed, epoch).

    epoch is one int, or a (B,) tensor of one epoch per sequence (a mixture's sources are on their own passes).
    """
    s = _mix_int(_mix_int(seed ^ _GOLDEN) ^ ((seed >> 32) & _M32))
    if isinstance(epoch, Tensor):  # the same bits as the int path: _mix is _mix_int on tensors
        k = _mix((epoch.to(device=uids.device, dtype=torch.int64) & _M32) ^ s)
    else:
        k = _mix_int(s ^ (epoch & _M32))
    uids = uids.to(torch.int64)
    lo, hi = uids & _M32, (uids >> 32) & _M32  # >> is arithmetic, the mask keeps the bit pattern
    return _mix(_mix(lo ^ k) ^ hi ^ _GOLDEN)


_POSITIONS: dict = {}


def _position_hash(length: int, stream: int, device) -> Tensor:
    """(L,) int64: the hashed counter of each position in a stream, built once per (L, stream, device)."""
    key = (length, stream, str(device))
    if key not in _POSITIONS:
        _POSITIONS[key] = _mix(torch.arange(length, dtype=torch.int64) * 8 + stream + _GOLDEN).to(device)
    return _POSITIONS[key]


def keyed_bits(keys: Tensor, length: int, stream: int) -> Tensor:
    """(B, L) int64 uniform 32-bit values for positions 0..L-1 of each keyed sequence, one stream of several."""
    return _mix(keys[:, None] ^ _position_hash(length, stream, keys.device)[None, :])


def keyed_bits_at(keys: Tensor, rows: Tensor, cols: Tensor, length: int, stream: int) -> Tensor:
    """keyed_bits(keys, length, stream)[rows, cols], computed only there (for the few selected positions)."""
    return _mix(keys.index_select(0, rows) ^ _position_hash(length, stream, keys.device).index_select(0, cols))


def _rehash(x: Tensor) -> Tensor:
    """One multiply-xorshift round: a second, cheaper stream derived from a hashed value."""
    x = (x ^ 0x5BD1E995) * _MIX & _M32
    x ^= x >> 15
    return x


def _threshold(prob: float) -> int:
    """p as a 24-bit integer threshold: `bits >> 8 < threshold` happens with probability p, on any device."""
    return int(round(prob * (1 << 24)))


# ---- selection --------------------------------------------------------------------------------------------

_TABLES: dict = {}


def _tables(vocab: Vocab, device) -> tuple[Tensor, Tensor]:
    """(is_special (V,) bool, regular ids (V',) int64) on `device`, built once per vocabulary and device."""
    key = (vocab, str(device))
    if key not in _TABLES:
        special = torch.zeros(vocab.size, dtype=torch.bool)
        special[list(vocab.special_ids)] = True
        _TABLES[key] = (special.to(device), torch.nonzero(~special).squeeze(1).to(device))
    return _TABLES[key]


def _eligible(tokens: Tensor, lengths: Tensor, vocab: Vocab) -> Tensor:
    """(B, L) bool: real positions that hold no special token."""
    # NOTE: checked on the CPU only: on a GPU the check would stall the stream every batch, and the shard
    # reader has already checked every id against the vocabulary (loader.format.decode_block).
    if tokens.device.type == "cpu" and tokens.numel() and (int(tokens.min()) < 0 or
                                                          int(tokens.max()) >= vocab.size):
        raise ValueError(f"token ids outside [0, {vocab.size}): the shards do not match this vocabulary")
    real = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
    special = _tables(vocab, tokens.device)[0].index_select(0, tokens.view(-1)).view(tokens.shape)
    return real & ~special


def _span_units(eligible, word_starts, keys, config):
    """Spans of whole words whose lengths are Geometric(span_p), cut at span_max words.

    A word opens a new span with probability span_p (a Bernoulli process gives geometric run lengths); a run
    that reaches span_max words is cut there.
    """
    L = eligible.shape[1]
    is_word = eligible & word_starts
    opens = is_word & ((keyed_bits(keys, L, stream=3) >> 8) < _threshold(config.span_p))
    word_idx = torch.cumsum(is_word.to(torch.int64), dim=1)  # (B, L) words seen so far
    prev = torch.cat([torch.zeros_like(eligible[:, :1]), eligible[:, :-1]], dim=1)
    opened = torch.where(opens | (eligible & ~prev), word_idx, torch.zeros_like(word_idx))
    run_start = torch.cummax(opened, dim=1).values  # word index where the current span opened
    return is_word & ((word_idx - run_start) % config.span_max == 0)


UNITS = {
    "token": lambda eligible, word_starts, keys, config: torch.ones_like(eligible),
    "word": lambda eligible, word_starts, keys, config: word_starts,
    "span": _span_units,
    "pmi": lambda eligible, unit_starts, keys, config: unit_starts,  # given the stored unit starts (see mask_batch)
}


def _unit_starts(eligible: Tensor, word_starts: Tensor, keys: Tensor, config: MaskingConfig) -> Tensor:
    """(B, L) bool: where a unit starts: where the mode says so, and after any ineligible position."""
    prev = torch.cat([torch.zeros_like(eligible[:, :1]), eligible[:, :-1]], dim=1)
    return eligible & (UNITS[config.selection](eligible, word_starts, keys, config) | ~prev)


def select(tokens: Tensor, word_starts: Tensor, lengths: Tensor, keys: Tensor, *,
           config: MaskingConfig, vocab: Vocab, rate: float | None = None) -> Tensor:
    """(B, L) bool: the positions chosen for prediction.

    Units (tokens, whole words or spans) are chosen whole. Exact count takes units in keyed random order until
    round(p * n) tokens are covered (a unit that would overshoot is taken only if at least half of it fits);
    Bernoulli takes each unit with probability p. p is `rate` when given (a schedule's), else config.mask_prob.
    """
    B, L = tokens.shape
    p = config.mask_prob if rate is None else check_rate(rate)
    eligible = _eligible(tokens, lengths, vocab)
    bits = keyed_bits(keys, L, stream=0) >> 8  # (B, L) 24 random bits
    starts = eligible if config.selection == "token" else _unit_starts(eligible, word_starts, keys, config)

    if config.count == "bernoulli":
        chosen = starts & (bits < _threshold(p))
        return chosen if config.selection == "token" else _spread(chosen, starts, eligible)

    n = eligible.sum(dim=1)  # (B,)
    target = torch.floor(n.to(torch.float64) * p + 0.5).to(torch.int64)
    target = torch.where(n > 0, target.clamp(min=1), target)
    # unique integer scores (random bits, then position): no ties, no float compare across devices
    pos = torch.arange(L, device=tokens.device, dtype=torch.int64)
    score = (bits * L + pos).masked_fill_(~starts, 1 << 62)
    # NOTE: every unit has >= 1 token, so no unit past rank max(target) + 1 can be taken: top-k, not a sort
    k = min(L, max(1, int(L * p + 0.5)) + 1)
    best, order = torch.topk(score, k, dim=1, largest=False, sorted=False)  # (B, k)
    best, perm = torch.sort(best, dim=1)  # sorting k values afterwards is cheaper than a sorted top-k
    order = order.gather(1, perm)
    if config.selection == "token":
        kth = best.gather(1, (target - 1).clamp(min=0)[:, None])
        return starts & (score <= kth) & (target > 0)[:, None]
    start_of = _start_of(starts)
    unit_len = torch.zeros_like(bits).scatter_add_(1, start_of, eligible.to(torch.int64))  # at unit starts
    len_sorted = unit_len.gather(1, order) * (best < (1 << 62))
    before = torch.cumsum(len_sorted, dim=1) - len_sorted
    take = (2 * before + len_sorted <= 2 * target[:, None]) & (len_sorted > 0)
    take[:, 0] |= target > 0  # the first unit is always taken, so no sequence goes without a prediction
    chosen = torch.zeros_like(starts).scatter_(1, order, take)
    return eligible & chosen.gather(1, start_of)


def check_rate(rate: float) -> float:
    """A mask rate handed in at run time (a schedule's) must be a probability the rule can use."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"mask rate {rate} must be in (0, 1)")
    return float(rate)


def _spread(chosen_starts: Tensor, starts: Tensor, eligible: Tensor) -> Tensor:
    """Extend a choice made at unit starts to every position of those units."""
    return eligible & chosen_starts.gather(1, _start_of(starts))


def _start_of(starts: Tensor) -> Tensor:
    """(B, L) int64: the position of the unit start at or before each position (0 before the first)."""
    B, L = starts.shape
    pos = torch.arange(L, device=starts.device, dtype=torch.int64).expand(B, L)
    return torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values


# ---- the whole rule ----------------------------------------------------------------------------------------

def mask_batch(tokens: Tensor, word_starts: Tensor, lengths: Tensor, uids: Tensor, *, seed: int, epoch: int,
               config: MaskingConfig, vocab: Vocab, rate: float | None = None) -> tuple[Tensor, Tensor]:
    """Mask a batch for one epoch: (input_ids, labels), both (B, L) int64 on the batch's device.

    tokens (B, L) any int dtype; word_starts (B, L) bool (with selection "pmi": the stored unit starts);
    lengths (B,); uids (B,) int64 (uint64 bit pattern).
    rate: the fraction to mask (a schedule's value at this step); None = config.mask_prob, bit for bit.
    """
    tokens = tokens.to(torch.int64)
    device = tokens.device
    keys = sequence_keys(uids.to(device), seed=seed, epoch=epoch)
    word_starts, lengths = word_starts.to(device=device, dtype=torch.bool), lengths.to(device)
    selected = select(tokens, word_starts, lengths, keys, config=config, vocab=vocab, rate=rate)
    labels = tokens.masked_fill(~selected, IGNORE_INDEX)
    unit_of = None
    if config.selection == "pmi":  # 80/10/10 per unit: a unit's tokens share the action drawn at its start
        unit_of = _start_of(_unit_starts(_eligible(tokens, lengths, vocab), word_starts, keys, config))
    # NOTE: dense on accelerators (no nonzero(), so no host sync), sparse on the CPU; the bits are the same
    dense = tokens.device.type != "cpu"
    return _corrupt(tokens, selected, keys, config=config, vocab=vocab, dense=dense, unit_of=unit_of), labels


def _corrupt(tokens: Tensor, selected: Tensor, keys: Tensor, *, config: MaskingConfig, vocab: Vocab,
             dense: bool, unit_of: Tensor | None = None) -> Tensor:
    """The 80/10/10 rule at the selected positions: mask token, random non-special token, or unchanged; drawn
    per token, or per unit when unit_of (B, L) gives each position's unit start (random ids stay per token)."""
    L = tokens.shape[1]
    regular = _tables(vocab, tokens.device)[1]
    keep_below = _threshold(config.mask_token_frac + config.random_token_frac)
    mask_below = _threshold(config.mask_token_frac)
    if dense:
        bits = keyed_bits(keys, L, stream=1)
        action = bits >> 8 if unit_of is None else (bits >> 8).gather(1, unit_of)
        random_ids = regular[(_rehash(bits) * regular.numel()) >> 32]
        inputs = torch.where(selected & (action < keep_below), random_ids, tokens)
        return inputs.masked_fill(selected & (action < mask_below), vocab.mask_id)
    # sparse: only the selected positions (~15% of the batch) are hashed
    rows, cols = torch.nonzero(selected).unbind(1)  # (S,) each
    flat = rows * L + cols
    bits = keyed_bits_at(keys, rows, cols, L, stream=1)
    action = bits >> 8 if unit_of is None else keyed_bits_at(keys, rows, unit_of[rows, cols], L, stream=1) >> 8
    pick = (_rehash(bits) * regular.numel()) >> 32  # uniform in [0, V')
    replaced = torch.where(action < keep_below, regular.index_select(0, pick),
                           tokens.view(-1).index_select(0, flat))
    replaced = replaced.masked_fill(action < mask_below, vocab.mask_id)
    inputs = tokens.clone()
    inputs.view(-1).index_copy_(0, flat, replaced)
    return inputs


def static_masks(tokens: Tensor, word_starts: Tensor, lengths: Tensor, uids: Tensor, *, seed: int, copies: int,
                 config: MaskingConfig, vocab: Vocab) -> tuple[Tensor, Tensor]:
    """BERT's static recipe as the same rule for epochs 0..K-1: (selected (B, K, L) bool, inputs (B, K, L))."""
    if copies < 1:
        raise ValueError(f"static copies={copies} must be >= 1 (BERT's dupe_factor is 10)")
    outs = [mask_batch(tokens, word_starts, lengths, uids, seed=seed, epoch=e, config=config, vocab=vocab)
            for e in range(copies)]
    selected = torch.stack([labels != IGNORE_INDEX for _, labels in outs], dim=1)
    inputs = torch.stack([inputs for inputs, _ in outs], dim=1)
    return selected, inputs


def static_copy(tokens: Tensor, selected: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """(input_ids, labels) of one stored static copy: selected and inputs are (B, L) for that copy."""
    tokens = tokens.to(torch.int64)
    labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return inputs.to(torch.int64), labels


def attention_mask(lengths: Tensor, seq_len: int) -> Tensor:
    """(B, L) bool: True at real positions."""
    return torch.arange(seq_len, device=lengths.device)[None, :] < lengths[:, None]
