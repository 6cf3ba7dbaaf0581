"""Tokenizers: `maskstream tokenizer train|convert`, and loading a tokenizer.json with its special-token facts.

train:   WordPiece BERT-style (lowercase, accents stripped, CJK characters split, [PAD]=0 [UNK] [CLS] [SEP]
         [MASK]) or byte-level BPE RoBERTa-style (<s>=0 <pad> </s> <unk> <mask>), streamed from the corpus
         through the pipeline's own readers, with a byte budget (--sample-bytes) for large corpora.
convert: a GPT-2 vocab.json + merges.txt pair to one tokenizer.json with the RoBERTa specials added.
load_tokenizer(): the tokenizers.Tokenizer plus TokenizerInfo (ids of pad/mask/cls/sep, the [CLS] .. [SEP]
         wrapping of its post-processor, all special ids, kind, sha256) -> loader.maskconfig.Vocab.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import typing
import zlib

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from maskstream.errors import MissingPath, UserError
from maskstream.flags import Parser

# kind -> (special tokens in id order, pad, unk, cls/bos, sep/eos, mask)
SPECIALS = {
    "wordpiece": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    "bpe": (["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<pad>", "<unk>", "<s>", "</s>", "<mask>"),
}
PAD_NAMES = ("[PAD]", "<pad>")
MASK_NAMES = ("[MASK]", "<mask>")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerInfo:
    """The facts the pipeline and index.json need about a tokenizer."""
    kind: str                          # wordpiece | bpe | other model type, lowercased
    sha256: str
    vocab_size: int                    # including added tokens
    pad_id: int
    mask_id: int
    cls_id: int                        # first id the post-processor puts before a sequence (BOS for BPE)
    sep_id: int                        # last id it puts after (EOS for BPE); also the document separator
    prefix: tuple[int, ...]            # ids put before a sequence, e.g. (101,)
    suffix: tuple[int, ...]            # ids put after, e.g. (102,)
    special_ids: tuple[int, ...]

    def vocab(self):
        """loader.maskconfig.Vocab, the facts the masking rule needs."""
        from maskstream.loader.maskconfig import Vocab
        return Vocab.from_index({"tokenizer": self.to_index()})  # the same rule the loader reads index.json by

    def to_index(self) -> dict:
        """The index.json "tokenizer" entry."""
        return {"sha256": self.sha256, "vocab_size": self.vocab_size, "pad_id": self.pad_id,
                "mask_id": self.mask_id, "cls_id": self.cls_id, "sep_id": self.sep_id,
                "special_ids": list(self.special_ids), "kind": self.kind}


def read_bytes(path: str) -> bytes:
    """A local path or any Beam filesystem URL (gs://, s3://)."""
    if os.path.exists(path):
        with open(path, "rb") as f:
            return f.read()
    from apache_beam.io.filesystems import FileSystems
    with FileSystems.open(path) as f:
        return f.read()


class TokenizerRef(typing.NamedTuple):
    """How tokenizer.json reaches the workers: by path where they share the launcher's files (the local
    runner), else inline as zlib bytes; its sha256 is checked either way.
    NOTE: Beam's pickler bz2-compresses (level 9) a DoFn each time it is pickled or unpickled, three times per
    ParDo and stage; the 0.7 MB BERT tokenizer carried inline was ~0.4 s of a 3.5 s SOTU job."""
    sha256: str
    path: str | None = None
    data: bytes | None = None

    @classmethod
    def of(cls, text: str, *, path: str | None = None) -> "TokenizerRef":
        sha = hashlib.sha256(text.encode()).hexdigest()
        return cls(sha, path=path) if path else cls(sha, data=zlib.compress(text.encode(), 1))

    def text(self) -> str:
        raw = zlib.decompress(self.data) if self.data is not None else read_bytes(self.path)
        if hashlib.sha256(raw).hexdigest() != self.sha256:
            raise RuntimeError(f"{self.path} changed while the job ran (sha256 {self.sha256[:12]} expected); "
                               "rerun the job with a tokenizer file that stays put")
        return raw.decode()


def tokenizer_from_json(text: str) -> Tokenizer:
    tok = Tokenizer.from_str(text)
    tok.no_padding()        # NOTE: a saved padding/truncation setting would silently change lengths
    tok.no_truncation()
    return tok


def describe(tok: Tokenizer, json_text: str) -> TokenizerInfo:
    """Special-token facts of a tokenizer, failing loudly when pad or mask are missing."""
    vocab = tok.get_vocab(with_added_tokens=True)
    specials = sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
    pad = next((vocab[n] for n in PAD_NAMES if n in vocab), None)
    mask = next((vocab[n] for n in MASK_NAMES if n in vocab), None)
    if pad is None or mask is None:
        what, names = ("pad", PAD_NAMES) if pad is None else ("mask", MASK_NAMES)
        raise UserError(f"the tokenizer has no {what} token (looked for {' or '.join(names)}); train one with "
                        "`maskstream tokenizer train` or add the token to it")
    # The post-processor's wrapping: find the content ids inside the full encoding.
    body = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    start = next((i for i in range(len(full) - len(body) + 1) if full[i:i + len(body)] == body), None)
    if not body or start is None:
        raise ValueError("cannot locate the content inside the tokenizer's post-processed encoding")
    prefix, suffix = tuple(full[:start]), tuple(full[start + len(body):])
    if not prefix or not suffix:
        raise ValueError(f"tokenizer's post-processor adds prefix={prefix} suffix={suffix}; the pipeline needs "
                         "both (BERT [CLS] .. [SEP], RoBERTa <s> .. </s>); save one with TemplateProcessing.")
    model_type = json.loads(json_text).get("model", {}).get("type", "unknown")
    return TokenizerInfo(kind=model_type.lower(), sha256=hashlib.sha256(json_text.encode()).hexdigest(),
                         vocab_size=tok.get_vocab_size(with_added_tokens=True), pad_id=pad, mask_id=mask,
                         cls_id=prefix[0], sep_id=suffix[-1], prefix=prefix, suffix=suffix,
                         special_ids=tuple(sorted(set(specials) | {pad, mask, *prefix, *suffix})))


def load_tokenizer(path: str) -> tuple[Tokenizer, TokenizerInfo, str]:
    """(tokenizer, info, json text) of a tokenizer.json file."""
    if "://" not in path and not os.path.isfile(path):
        raise MissingPath(f"tokenizer file {path} does not exist; pass a tokenizer.json "
                          "(make one with `maskstream tokenizer train`)")
    try:
        text = read_bytes(path).decode("utf-8")
        tok = tokenizer_from_json(text)
    except Exception as e:   # the tokenizers library raises a bare Exception for any malformed file
        raise UserError(f"{path} is not a tokenizers `tokenizer.json` ({str(e).splitlines()[0][:80]}); "
                        "pass one saved by Tokenizer.save or `maskstream tokenizer train`") from e
    return tok, describe(tok, text), text


def _template(tok: Tokenizer, kind: str) -> processors.TemplateProcessing:
    _, _, _, cls, sep, _ = SPECIALS[kind]
    pair = f"{cls} $A {sep} $B:1 {sep}:1" if kind == "wordpiece" else f"{cls} $A {sep} {sep} $B:1 {sep}:1"
    return processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=pair,
                                         special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])


def new_tokenizer(kind: str) -> tuple[Tokenizer, object]:
    """An untrained tokenizer of `kind` and its trainer factory (vocab_size -> trainer)."""
    specials, _, unk = SPECIALS[kind][:3]
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=unk))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        return tok, lambda n: trainers.WordPieceTrainer(vocab_size=n, special_tokens=specials,
                                                        show_progress=False)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok, lambda n: trainers.BpeTrainer(vocab_size=n, special_tokens=specials, show_progress=False,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


def train(texts, *, kind: str, vocab_size: int) -> Tokenizer:
    """Train on an iterator of strings; returns a tokenizer with its specials and post-processor."""
    if kind not in SPECIALS:
        raise ValueError(f"kind={kind!r}; allowed: {'|'.join(SPECIALS)}")
    tok, make_trainer = new_tokenizer(kind)
    tok.train_from_iterator(texts, make_trainer(vocab_size))
    tok.post_processor = _template(tok, kind)
    return tok


def sample_texts(paths: list[str], *, text_field: str, sample_bytes: int, progress: bool = True):
    """Documents of the inputs (globs expanded); with sample_bytes, each file is read up to its even share of
    sample_bytes (bytes read, so the progress bar's total is known before reading: the bytes it will read)."""
    from tqdm import tqdm

    from maskstream.pipeline.config import SourceConfig
    from maskstream.pipeline.readers import clean_record, expand_inputs, iter_raw_records, record_bytes, text_size
    source = SourceConfig(inputs=tuple(paths), text_field=text_field)
    files = expand_inputs(source.inputs)
    budget = sample_bytes // len(files) if sample_bytes else None
    sizes = [text_size(f.path, f.size) for f in files]
    will_read = [min(n, budget) if budget is not None else n for n in sizes]
    bar = tqdm(total=sum(will_read), unit="B", unit_scale=True, desc="reading text", disable=not progress)
    for file, planned in zip(files, will_read, strict=True):
        used = 0
        for raw in iter_raw_records(file.path, source):
            n = record_bytes(raw)
            used += n
            bar.update(n)
            out = clean_record(raw, source)
            if isinstance(out, list):
                yield from (doc.text for doc in out)
            if budget is not None and used >= budget:
                break
        if used != planned:  # an estimate (Parquet, remote .gz) or a last record past the share: the true count
            bar.total += used - planned
            bar.refresh()
    bar.close()


def convert_gpt2(vocab_path: str, merges_path: str) -> Tokenizer:
    """A GPT-2 byte-level BPE pair as one tokenizer with RoBERTa's specials and post-processor added."""
    # What tokenizers.ByteLevelBPETokenizer builds (same JSON), through the public Tokenizer API, not its ._tokenizer.
    tok = Tokenizer(models.BPE.from_file(vocab_path, merges_path, continuing_subword_prefix="",
                                         end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(SPECIALS["bpe"][0])
    tok.post_processor = _template(tok, "bpe")
    return tok


def parser(cls=Parser) -> argparse.ArgumentParser:
    """The flags of `maskstream tokenizer`; `cls` lets the Python API (maskstream.api) raise where the CLI
    prints usage."""
    parser = cls(prog="maskstream tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a tokenizer on text/JSONL/Parquet inputs")
    t.add_argument("--input", nargs="+", action="extend", required=True, help="paths or globs (repeatable)")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, specials included")
    t.add_argument("--kind", choices=sorted(SPECIALS), default="wordpiece",
                   help="wordpiece: BERT-style, lower-cased; bpe: RoBERTa-style byte-level BPE")
    t.add_argument("--out", required=True, help="tokenizer.json to write")
    t.add_argument("--text-field", default="text", help="JSONL field / Parquet column")
    t.add_argument("--sample-bytes", type=int, default=200_000_000,
                   help="read at most this many bytes of the inputs, split evenly over the files (0 = all)")
    c = sub.add_parser("convert", help="GPT-2 vocab.json + merges.txt -> tokenizer.json with <s> <pad> </s> <mask>")
    c.add_argument("--vocab", required=True, help="GPT-2 vocab.json")
    c.add_argument("--merges", required=True, help="GPT-2 merges.txt")
    c.add_argument("--out", required=True, help="tokenizer.json to write")
    return parser


def run(argv=None, *, parser_class=Parser) -> tuple[str, TokenizerInfo]:
    """Train or convert as the flags say, save to --out; returns that path and the saved tokenizer's facts."""
    p = parser(parser_class)
    args = p.parse_args(argv)
    if args.cmd == "train":
        if args.vocab_size < 100:
            p.error(f"--vocab-size {args.vocab_size} is too small; use e.g. 8000 or 30522")
        texts = sample_texts(args.input, text_field=args.text_field, sample_bytes=args.sample_bytes)
        tok = train(texts, kind=args.kind, vocab_size=args.vocab_size)
    else:
        tok = convert_gpt2(args.vocab, args.merges)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tok.save(args.out)
    return args.out, load_tokenizer(args.out)[1]


def main(argv=None) -> int:
    out, info = run(argv)
    print(f"wrote {out}: {info.kind}, {info.vocab_size} tokens, pad={info.pad_id} mask={info.mask_id} "
          f"cls={info.cls_id} sep={info.sep_id}", file=sys.stderr)
    return 0
