"""`maskstream inspect`: summarize a shard folder, verify it, show masked sequences, or dump the masks it yields.

    maskstream inspect DIR                                 # the manifest summary
    maskstream inspect DIR --verify                        # sha256, record checksums, sizes, counts; exit 1 if bad
    maskstream inspect DIR --show 3 --epoch 1              # 3 sequences as the model sees them, masks marked
    maskstream inspect DIR --dump-masks m.jsonl --epoch 0 [--num-workers W] [--batch-size B]
                           [--rank R --world-size N] [--limit N]   # one JSON line per sequence

--show and --dump-masks run the real loader path (MLMLoader), so what they print is what training gets; each
dumped line carries the step (the rank's batch index in the epoch) and the source of the sequence.
DIR may be a local folder, a URL prefix (http(s)://, gs://, s3://) or a mixture file (mix.json).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

from maskstream.errors import UserError
from maskstream.flags import Parser
from maskstream.loader import format as fmt
from maskstream.loader.masking import IGNORE_INDEX
from maskstream.loader.stages import decode_record, read_record
from maskstream.loader.storage import LocalSource, SourceError
from maskstream.loader.stream import LoaderConfig, MLMLoader
from maskstream.loader.text import NEWLINE, dataset_tokenizer, decode_units, mask_marker, token_text, uid_text


def summary(loader: MLMLoader) -> str:
    """The manifest in a few lines (a mixture: its sources and shares, then each source's manifest)."""
    if loader.mixture is None:
        return _manifest(loader.root, loader.datasets[0])
    plan = loader.mix_plan
    lines = [f"mixture    {loader.root}: {len(loader.datasets)} sources, {loader.batches_per_epoch} steps of "
             f"{plan.global_batch} sequences an epoch, {plan.partitions} partition(s), fingerprint "
             f"{loader.fingerprint[:12]}"]
    for name, ds, share, base in zip(loader.source_names, loader.datasets, plan.share, plan.base, strict=True):
        lines.append(f"source     {name}: share {float(share):.4f} ({base}-{base + 1} of every "
                     f"{plan.global_batch}), {ds.table.num_sequences:,} sequences, {ds.root}")
    return "\n".join(lines + [f"\n[{name}]\n" + _manifest(ds.root, ds)
                              for name, ds in zip(loader.source_names, loader.datasets, strict=True)])


def _manifest(root: str, ds) -> str:
    ix, c = ds.index, ds.index["counts"]
    total = sum(s["bytes"] for s in ix["shards"])
    tokens = max(1, c.get("tokens", 0))
    records = len(ds.table.sequences)
    tok, m = ix["tokenizer"], ix["masking"]
    rejects = ", ".join(f"{k} {v:,}" for k, v in sorted(c.get("rejects_by_reason", {}).items())) or "none"
    return "\n".join([
        f"dataset    {root} (format v{ix['format_version']}, fingerprint {ds.fingerprint[:12]})",
        f"documents  read {c.get('documents_read', 0):,} = written {c.get('documents_written', 0):,} + "
        f"rejected {c.get('documents_rejected', 0):,} ({rejects})",
        f"sequences  {c['sequences']:,} of {ix['seq_len']} tokens, packing {ix['packing']}, "
        f"{c.get('tail_sequences', 0):,} padded tails",
        f"tokens     {c.get('tokens', 0):,} real tokens; {total / tokens:.3f} bytes/token",
        f"shards     {len(ix['shards'])}, {total / 1e6:.2f} MB, {records} records "
        f"(mean {c['sequences'] / max(1, records):.1f} sequences/record)",
        f"tokenizer  {tok.get('kind', '?')}, vocab {tok['vocab_size']:,}, mask id {tok['mask_id']}, "
        f"special ids {tok['special_ids']}, sha256 {str(tok.get('sha256', ''))[:12]}",
        f"masking    {m['mode']}" + (f" ({m['static_copies']} stored copies, seed {m['seed']})"
                                     if m["mode"] == "static" else "") + f", {m['config']}",
        f"inputs     {len(ix.get('inputs', []))} file(s)",
    ])


def verify(loader: MLMLoader, out=None) -> list[str]:
    """Check every shard of every dataset: size and sha256 of the whole file, then every record (checksum,
    decoded, counted).

    A bad shard does not stop the check: every shard and every record is looked at, and each bad shard is
    printed with its problems. Returns the names of bad shards (empty when all are good)."""
    bad, out = [], out or sys.stdout
    for name, ds in zip(loader.source_names, loader.datasets, strict=True):
        prefix = f"{name}/" if loader.mixture else ""
        bad += [prefix + shard for shard in _verify(ds, out, prefix)]
    return bad


def _verify(ds, out, prefix: str) -> list[str]:
    bad, table, index = [], ds.table, ds.index
    for s, entry in enumerate(index["shards"]):
        name, problems, count = entry["name"], [], 0
        try:
            sha = _shard_sha256(ds.source, entry)
            if sha != entry["sha256"]:
                problems.append(f"sha256 {sha[:12]}... but index.json says {entry['sha256'][:12]}...")
            for r in (int(r) for r in (table.shard == s).nonzero()[0]):
                try:
                    block, _ = decode_record(read_record(ds.source, index, table, r), index, table, r, 0, 0)
                    count += len(block)
                except fmt.FormatError as e:
                    problems.append(str(e))
            if not problems and count != entry["sequences"]:
                problems.append(f"{count} sequences, index.json says {entry['sequences']}")
        except SourceError as e:  # missing, truncated or unreadable: the shard's records cannot be read
            problems.append(str(e))
        if problems:
            more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
            print(f"BAD  {prefix}{name}: {'; '.join(problems[:3])}{more}", file=out)
            bad.append(name)
        else:
            print(f"OK   {prefix}{name}: {entry['bytes']:,} bytes, {count:,} sequences, sha256 and record "
                  f"checksums ok", file=out)
    return bad


def _shard_sha256(source, entry: dict) -> str:
    if isinstance(source, LocalSource):
        path = os.path.join(source.root, fmt.check_shard_name(entry["name"]))
        if not os.path.exists(path):
            raise SourceError(f"{path} is missing")
        if os.path.getsize(path) != entry["bytes"]:
            raise SourceError(f"{os.path.getsize(path):,} bytes, index.json says {entry['bytes']:,}: truncated "
                              f"or rewritten")
        return fmt.shard_sha256(path)
    return hashlib.sha256(source.read_range(entry["name"], 0, entry["bytes"], entry["bytes"])).hexdigest()


def sequences(loader: MLMLoader, limit: int | None):
    """(step, source, uid, input_ids, labels, length) of each sequence the loader yields, in order, up to `limit`."""
    n, step = 0, loader.sequences_consumed // loader.config.batch_size
    for batch in loader:
        sources = batch["sources"].tolist() if "sources" in batch else [0] * len(batch["uids"])
        for src, uid, ids, labels, attn in zip(sources, batch["uids"].tolist(), batch["input_ids"].tolist(),
                                               batch["labels"].tolist(), batch["attention_mask"].sum(1).tolist(),
                                               strict=True):
            yield step, loader.source_names[src], uid, ids, labels, attn
            n += 1
            if limit is not None and n >= limit:
                return
        step += 1


def render(tokenizer, ids, labels, length: int, mask_id: int) -> str:
    """One sequence for a person, decoded by the tokenizer's own decoder: [MASK/word] masked (in the tokenizer's
    own mask token), {word->other} replaced by a random token, <word> kept but predicted."""
    if tokenizer is None:   # no tokenizer file: ids, marked the same way
        pairs = zip(ids[:length], labels[:length], strict=True)
        return " ".join(f"#{x}" if y == IGNORE_INDEX else f"[#{x}/#{y}]" for x, y in pairs)
    original = [y if y != IGNORE_INDEX else x for x, y in zip(ids[:length], labels[:length], strict=True)]
    out = []
    for unit in decode_units(tokenizer, original):
        text = unit.text.replace("\n", NEWLINE)
        predicted = [p for p in unit.positions if labels[p] != IGNORE_INDEX]
        word = text.strip()
        if not predicted or not word:
            out.append(text)
            continue
        if any(ids[p] == mask_id for p in predicted):
            word = mask_marker(tokenizer, mask_id, word)
        elif any(ids[p] != labels[p] for p in predicted):
            word = f"{{{word}->{''.join(token_text(tokenizer, ids[p]) for p in predicted)}}}"
        else:
            word = f"<{word}>"
        out.append(text[: len(text) - len(text.lstrip())] + word)
    return "".join(out).strip()


def main(argv=None) -> int:
    p = Parser(prog="maskstream inspect", description=__doc__)
    p.add_argument("dataset", help="shard folder or URL prefix holding index.json, or a mixture file (.json)")
    p.add_argument("--verify", action="store_true", help="check sha256, size and counts of every shard")
    p.add_argument("--show", type=int, metavar="N", help="print N sequences as text, their masks marked "
                   "(default: none; without --show, --verify or --dump-masks: the summary)")
    p.add_argument("--dump-masks", metavar="FILE", help="write uid (16 hex digits), input_ids, labels per sequence "
                   "as JSON lines (default: no dump)")
    p.add_argument("--epoch", type=int, default=0, help="epoch whose order and masks to use")
    p.add_argument("--seed", type=int, default=0, help="loader seed (order and dynamic masks)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (the output does not change)")
    p.add_argument("--batch-size", type=int, default=1, help="loader batch size (1: nothing dropped)")
    p.add_argument("--rank", type=int, default=0, help="this rank's share of the data, with --world-size")
    p.add_argument("--world-size", type=int, default=1, help="ranks the data is split over")
    p.add_argument("--limit", type=int, default=None, help="stop after N sequences (default: all)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json for --show (default: DIR/tokenizer.json, "
                   "else the file index.json names)")
    args = p.parse_args(argv)

    cfg = LoaderConfig(batch_size=args.batch_size, seed=args.seed, num_workers=args.num_workers,
                       pin_memory=False)
    try:
        loader = MLMLoader(args.dataset, cfg, rank=args.rank, world_size=args.world_size)
    except UserError:
        raise              # one line from the CLI (a traceback with --debug)
    except (SourceError, ValueError) as e:   # a URL that does not answer, a --rank/--world-size/--batch-size misfit
        raise UserError(str(e)) from e
    loader.set_epoch(args.epoch)
    if not (args.verify or args.show or args.dump_masks):
        print(summary(loader))
        return 0
    if args.verify:
        bad = verify(loader)
        if bad:
            print(f"{len(bad)} bad shard(s): {', '.join(bad)}", file=sys.stderr)
            return 1
        print(f"all {sum(len(ds.index['shards']) for ds in loader.datasets)} shards verified")
    if args.show:
        tokenizer = dataset_tokenizer(str(loader.root), loader.index, args.tokenizer)
        if tokenizer is None:
            print("(no tokenizer file found: showing ids; pass --tokenizer FILE for text)", file=sys.stderr)
        mask_id = loader.vocab.mask_id
        marker = mask_marker(tokenizer, mask_id, "w") if tokenizer is not None else "[#mask/#w]"
        print(f"epoch {args.epoch}, seed {args.seed}: {marker} masked, {{w->x}} random token, <w> kept, predicted")
        for _, source, uid, ids, labels, length in sequences(loader, args.show):
            origin = f", {source}" if loader.mixture else ""
            print(f"\nuid {uid_text(uid)} ({length} tokens, {sum(y != IGNORE_INDEX for y in labels)} to predict"
                  f"{origin})")
            print(render(tokenizer, ids, labels, length, mask_id))
        loader.set_epoch(args.epoch)
    if args.dump_masks:
        n = 0
        with open(args.dump_masks, "w") as f:
            for step, source, uid, ids, labels, _ in sequences(loader, args.limit):
                line = {"step": step, "source": source, "uid": uid_text(uid), "input_ids": ids, "labels": labels}
                f.write(json.dumps(line, separators=(",", ":")) + "\n")
                n += 1
        print(f"wrote {n} sequences of epoch {args.epoch} (rank {args.rank}/{args.world_size}) to {args.dump_masks}")
    return 0


if __name__ == "__main__":
    from maskstream.errors import run_command
    sys.exit(run_command("maskstream inspect", main))
