"""`make bench-peers`: MLMLoader against the peer loaders, mosaicml-streaming and litdata, in one run on the same
sequences from local disk, each peer masked the way its users mask (Hugging Face's DataCollatorForLanguageModeling
in a torch DataLoader, mlm_probability = our mask_prob); then our loader's epoch 2 over HTTP.

    1. our Beam job (`maskstream preprocess`) on the bundled SOTU corpus, bert-base-uncased, 128 tokens -> shards
    2. export_tokens: those shards' sequences, in record order, to a plain (N, L) uint16 tokens.npy
    3. .venv-peers' python runs bench/peers_worker.py convert: MDS shards and litdata chunks of tokens.npy,
       read back and checked equal to it
    4. rounds, contenders interleaved: ours in this process, each peer in a fresh .venv-peers process (its JSON
       read back); each over BATCHES batches of BATCH x SEQ_LEN after WARMUP batches (worker start included in
       the warm-up), with workers 0 and 2; medians of the rounds
    5. ours over HTTP (a Range-capable server on 127.0.0.1 in its own process): epoch 1 read whole, epoch 2 timed,
       the server counting its shard requests; with a local cache when LoaderConfig has one, else plain
       streaming, and the table says which
    6. one table: every figure beside its anchor, and ours / best peer (target >= 3x)

The peers run in their own venv because their pins conflict with ours (mosaicml-streaming 0.13 needs numpy < 2.2
and transformers < 5); `make bench-peers` builds it from bench/requirements-peers.txt.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.server
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from maskstream.bench.bench_loader import BATCH, CORPUS, ROOT, SEQ_LEN, TOKENIZER
from maskstream.bench.common import Row, table
from maskstream.bench.peers_worker import measure
from maskstream.errors import UserError, run_command
from maskstream.loader import format as fmt
from maskstream.loader.order import RecordTable
from maskstream.loader.stages import decode_record, load_index, read_record
from maskstream.loader.storage import open_source
from maskstream.loader.stream import LoaderConfig, MLMLoader

PEERS_VENV = ROOT / ".venv-peers"  # built by `make bench-peers`, which writes .installed last
PEERS_PYTHON = PEERS_VENV / "bin" / "python"
WORKER = Path(__file__).with_name("peers_worker.py")
PEERS = {"mosaic": "mosaic StreamingDataset", "litdata": "litdata StreamingDataset"}  # versions: requirements-peers
WORKERS = (0, 2)
WARMUP, BATCHES = 3, 24  # 27 of SOTU's 65 batches per epoch: every contender stays inside one epoch


def make_shards(out: Path) -> dict:
    """Our Beam job on SOTU, in a fresh process as a user runs it; returns its index.json."""
    subprocess.run([sys.executable, "-m", "maskstream.pipeline.run", "--input", str(CORPUS), "--tokenizer",
                    str(TOKENIZER), "--output", str(out), "--seq-len", str(SEQ_LEN), "--num-shards", "4",
                    "--seed", "0", "--quiet", "--overwrite"], check=True, cwd=ROOT)
    return fmt.read_index((out / fmt.INDEX_FILE).read_bytes())


def export_tokens(root: str, path: Path) -> np.ndarray:
    """Every sequence of a dataset in index.json's record order, saved as (N, L) uint16 .npy: the peers' input.

    Padded tails keep their pad ids: the peers' collator treats [PAD] as special, as our masking does."""
    source = open_source(root)
    index, _ = load_index(source)
    if fmt.token_dtype(index["tokenizer"]["vocab_size"]) != np.uint16:
        raise UserError(f"{root}: vocab_size {index['tokenizer']['vocab_size']} needs uint32 tokens; the peers' "
                        "formats here are written as uint16; benchmark a dataset with a vocabulary <= 65536")
    table_ = RecordTable.from_index(index)
    blocks = [decode_record(read_record(source, index, table_, r), index, table_, r, 0, 0)[0]
              for r in range(len(table_.sequences))]
    tokens = np.concatenate([b.tokens for b in blocks]).astype(np.uint16, copy=False)
    np.save(path, tokens)
    return tokens


def peers_python(path: str | None) -> Path:
    """The peers' python: --peers-python, else .venv-peers' once `make bench-peers` has finished building it."""
    python = Path(path) if path else PEERS_PYTHON
    built = python.exists() if path else (PEERS_VENV / ".installed").exists()
    if not built:
        raise UserError(f"{python} not found or its venv unfinished: the peer loaders run in their own venv; run "
                        "`make bench-peers`, which builds .venv-peers from bench/requirements-peers.txt")
    return python


def run_worker(python: Path, args: list[str], out: Path) -> dict:
    """One peers_worker.py command; its chatter (litdata's progress bars) is shown only when it fails."""
    proc = subprocess.run([str(python), str(WORKER), *args, "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    return json.loads(out.read_text())


class PeerProcess:
    """One peer's loader in a .venv-peers process (peers_worker.py serve): its imports, dataset and collator made
    once, outside any timing; then each time() is one new DataLoader over it, answered as a JSON line."""

    def __init__(self, python: Path, peer: str, data: Path, mask_prob: float, *, batch: int = BATCH):
        self.peer = peer
        self.proc = subprocess.Popen(
            [str(python), str(WORKER), "serve", "--peer", peer, "--data", str(data), "--tokenizer", str(TOKENIZER),
             "--mlm-probability", str(mask_prob), "--seq-len", str(SEQ_LEN), "--batch", str(batch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.peer} process ended (exit {self.proc.wait()}); its error is above")
        return json.loads(line)

    def ready(self) -> dict:
        return self._answer()

    def time(self, *, workers: int, masked: bool = True, warmup: int = WARMUP, batches: int = BATCHES) -> dict:
        ask = {"workers": workers, "warmup": warmup, "batches": batches, "masked": masked}
        self.proc.stdin.write(json.dumps(ask) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def __enter__(self) -> "PeerProcess":
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def loader_config(workers: int, cache_dir: Path | None = None) -> LoaderConfig:
    extra = {}
    if cache_dir is not None and has_cache():
        extra["cache_dir"] = str(cache_dir)
    return LoaderConfig(batch_size=BATCH, num_workers=workers, pin_memory=False, **extra)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """GET of one file of the served folder, whole or one byte range (what loader.storage.HTTPSource asks)."""
    protocol_version = "HTTP/1.1"  # keep-alive, as object stores do

    def do_GET(self):
        path = self.server.root / self.path.lstrip("/")
        if path.parent != self.server.root or not path.is_file():
            return self.send_error(404)
        if path.suffix == ".tar":
            with self.server.shard_requests.get_lock():
                self.server.shard_requests.value += 1
        size = path.stat().st_size
        first, last = 0, size - 1
        if self.headers.get("Range"):
            first, last = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
        with open(path, "rb") as f:
            f.seek(first)
            body = f.read(last + 1 - first)
        self.send_response(206 if self.headers.get("Range") else 200)
        if self.headers.get("Range"):
            self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class RangeServer:
    """A folder served on 127.0.0.1 by a process of its own (so it takes no GIL from the loader it feeds)."""

    def __init__(self, root: Path):
        context = multiprocessing.get_context("fork")
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
        self.server.root = Path(root).resolve()
        self.server.shard_requests = context.Value("q", 0)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.process = context.Process(target=self.server.serve_forever, daemon=True)

    def shard_requests(self) -> int:
        return int(self.server.shard_requests.value)

    def __enter__(self) -> "RangeServer":
        self.process.start()
        self.server.socket.close()  # the child serves; this process only counts
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.join()


def has_cache() -> bool:
    """Whether this build's loader has the local cache for remote datasets (LoaderConfig.cache_dir)."""
    return "cache_dir" in {f.name for f in dataclasses.fields(LoaderConfig)}


def time_ours(root: str, workers: int) -> dict:
    """Ours on local shards, epoch 0, timed like the peers (peers_worker.measure)."""
    batches = iter(MLMLoader(root, loader_config(workers)))
    try:
        return measure(batches, warmup=WARMUP, batches_timed=BATCHES)
    finally:
        batches.close()  # stops the workers now, not at garbage collection


def time_ours_http(root: Path, workers: int, cache_dir: Path) -> dict:
    """Ours over HTTP: epoch 1 read whole (it fills the cache, when there is one), epoch 2 timed; the server
    counts the shard requests of each epoch."""
    with RangeServer(root) as server:
        loader = MLMLoader(server.url, loader_config(workers, cache_dir))
        for _ in loader:  # epoch 1, whole
            pass
        first = server.shard_requests()
        batches = iter(loader)  # epoch 2
        try:
            result = measure(batches, warmup=WARMUP, batches_timed=BATCHES)
        finally:
            batches.close()
        result["shard_requests"] = {"epoch1": first, "epoch2": server.shard_requests() - first}
    return result


def median(results: list[dict]) -> dict:
    out = dict(results[len(results) // 2])
    for key in ("tokens_per_s", "tokens_per_cpu_s"):
        out[key] = statistics.median(r[key] for r in results)
    out["rounds"] = [round(r["tokens_per_s"]) for r in results]
    return out


def round_ratios(runs: dict) -> list[float]:
    """Ours (best workers) / the best peer, within each round: contenders minutes apart see different loads."""
    rounds = len(runs["ours", 0])
    best = lambda names, r: max(runs[n, w][r]["tokens_per_s"] for n in names for w in WORKERS)  # noqa: E731
    return [best(["ours"], r) / best(PEERS, r) for r in range(rounds)]


def rows_of(fig: dict, cpu: dict, http: dict) -> list[Row]:
    def name(key):
        peer, w = key
        how = "unmasked (torch.stack)" if peer.endswith(" unmasked") else "+ HF collator"
        return f"{PEERS[peer.removesuffix(' unmasked')]} {how}, workers={w}"

    rows = []
    for w in WORKERS:
        for peer in PEERS:
            rows.append(Row(area="peers", name=f"MLMLoader, CPU masking, workers={w}", value=fig["ours", w],
                            unit="tokens/s", anchor=name((peer, w)), anchor_value=fig[peer, w]))
    for peer in PEERS:  # their loader without any masking: how much of the gap is HF's collator
        rows.append(Row(area="peers", name="MLMLoader, CPU masking, workers=0", value=fig["ours", 0],
                        unit="tokens/s", anchor=name((peer + " unmasked", 0)), anchor_value=fig[peer + " unmasked", 0]))
    for peer in PEERS:  # workers=0: all the work in one process, so CPU time is comparable (see measure())
        rows.append(Row(area="peers", name="MLMLoader, CPU masking, workers=0, per CPU second",
                        value=cpu["ours", 0], unit="tokens/CPU-s", anchor=name((peer, 0)) + ", per CPU second",
                        anchor_value=cpu[peer, 0]))
    ours_w = max(WORKERS, key=lambda w: fig["ours", w])
    best = max(((p, w) for p in PEERS for w in WORKERS), key=lambda k: fig[k])
    rows.append(Row(area="peers", name=f"MLMLoader best (workers={ours_w}) vs best peer", value=fig["ours", ours_w],
                    unit="tokens/s", anchor=name(best), anchor_value=fig[best], target=">= 3x"))
    how = "local cache" if has_cache() else "plain HTTP streaming, no cache in this build"
    for w in WORKERS:
        rows.append(Row(area="peers", name=f"MLMLoader epoch 2 over HTTP ({how}), workers={w}",
                        value=http[w]["tokens_per_s"], unit="tokens/s", anchor=name(best) + ", local disk",
                        anchor_value=fig[best]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m maskstream.bench.bench_peers", description=__doc__.splitlines()[0])
    p.add_argument("--peers-python", default=None, help=f"the peers' venv python (default: {PEERS_PYTHON})")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each contender, interleaved (default 3)")
    p.add_argument("--workdir", default=None, help="where shards and results go (default: a temp dir)")
    args = p.parse_args(argv)
    python = peers_python(args.peers_python)
    # NOTE: one intra-op thread for every contender, as in bench_loader (peers_worker sets the same)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ms-bench-peers-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        shards = work / "shards"
        index = make_shards(shards)
        tokens = export_tokens(str(shards), work / "tokens.npy")
        print(f"{len(tokens):,} sequences of {SEQ_LEN} ({tokens.size / 1e6:.2f}M tokens) from our job in {shards}; "
              f"each contender timed over {BATCHES} batches of {BATCH} after {WARMUP}", flush=True)
        conv = run_worker(python, ["convert", "--tokens", str(work / "tokens.npy"), "--out", str(work / "peers")],
                          work / "convert.json")
        print(f"converted for the peers and read back equal: MDS {conv['convert_s']['mosaic']:.1f} s, litdata "
              f"{conv['convert_s']['litdata']:.1f} s", flush=True)
        mask_prob = float(index["masking"]["config"]["mask_prob"])
        runs: dict[tuple, list[dict]] = {}
        with contextlib.ExitStack() as stack:
            peers = {p: stack.enter_context(PeerProcess(python, p, work / "peers", mask_prob)) for p in PEERS}
            for p in peers.values():
                p.ready()
            for r in range(args.rounds):
                for w in WORKERS:
                    runs.setdefault(("ours", w), []).append(time_ours(str(shards), w))
                    for name, p in peers.items():
                        runs.setdefault((name, w), []).append(p.time(workers=w))
                for name, p in peers.items():  # where the peers' time goes: their loader alone, unmasked
                    runs.setdefault((name + " unmasked", 0), []).append(p.time(workers=0, masked=False))
                print(f"round {r + 1}: " + ", ".join(f"{k[0]} w={k[1]} {v[-1]['tokens_per_s'] / 1e6:.2f}M"
                                                     for k, v in runs.items()), flush=True)
        results = {k: median(v) for k, v in runs.items()}
        http = {w: median([time_ours_http(shards, w, work / f"cache-{w}-{r}") for r in range(args.rounds)])
                for w in WORKERS}
        for w, h in http.items():
            print(f"ours over HTTP, workers={w}: epoch 2 {h['tokens_per_s'] / 1e6:.2f}M tokens/s; shard requests "
                  f"epoch 1 {h['shard_requests']['epoch1']}, epoch 2 {h['shard_requests']['epoch2']}")
        fig = {k: v["tokens_per_s"] for k, v in results.items()}
        cpu = {k: v["tokens_per_cpu_s"] for k, v in results.items()}
        ratios = round_ratios(runs)
        print("ours (best workers) / best peer, round by round: " + ", ".join(f"{x:.1f}x" for x in ratios))
        (work / "results.json").write_text(json.dumps(
            {"local": {f"{k[0]}-w{k[1]}": v for k, v in results.items()}, "http": http, "convert": conv,
             "cache": has_cache(), "round_ratios": ratios}, indent=1))
        print("\n=== maskstream vs the peer loaders (same run, same sequences) ===")
        print(table(rows_of(fig, cpu, http)))
    return 0


if __name__ == "__main__":
    sys.exit(run_command("bench-peers", main))
