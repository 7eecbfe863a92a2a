"""Store I/O benchmark: ingest throughput, stored size, random-read latency, index scaling.

    python benchmarks/store_io.py                       # the full run (several GB of scratch space)
    python benchmarks/store_io.py --quick               # minutes, small stores

Rows are realistic: an example's k is the number of distinct tokens among 512 Zipf(1.1) draws over a
50257-token vocabulary (what a 512-token text gives), values are heavy-tailed (normal x lognormal per row), D=768.
Prints tables and writes JSON to benchmarks/results/store_io.json. Read paths compared on the same arrays:
this store's reader, zarr-python, and tensorstore (if installed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gradstore import GradStore

D, V = 768, 50257


def distinct_token_counts(n: int, rng: np.random.Generator, length: int = 512) -> np.ndarray:
    ranks = np.arange(1, V + 1)
    p = ranks ** -1.1
    p /= p.sum()
    return np.array([np.unique(rng.choice(V, size=length, p=p)).size for _ in range(n)])


def make_examples(n: int, rng: np.random.Generator, ks: np.ndarray) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    tokens = [rng.choice(V, size=k, replace=False) for k in ks[:n]]
    rows = [torch.from_numpy((rng.standard_normal((k, D)) * np.exp(rng.standard_normal((k, 1))))
                             .astype(np.float32)) for k in ks[:n]]
    return tokens, rows


def ingest(uri: str, n: int, dtype: str, codec: str, rng: np.random.Generator, ks: np.ndarray,
           pool: int = 256) -> dict:
    """Append n examples in batches of 64 (a training step's worth), buffered into ~64 MiB segments."""
    store = GradStore.create(uri, dim=D, vocab_size=V, dtype=dtype, codec=codec)
    tokens, rows = make_examples(min(n, pool), rng, ks)
    if dtype == "bfloat16":  # capture hands over bf16 or fp32; convert outside the timed region either way
        rows = [r.to(torch.bfloat16) for r in rows]
    logical = 0
    start = time.perf_counter()
    with store.writer(buffer_bytes=64 << 20) as w:
        for base in range(0, n, 64):
            idx = [(base + j) % len(tokens) for j in range(min(64, n - base))]
            w.append(list(range(base, base + len(idx))), [tokens[i] for i in idx], [rows[i] for i in idx])
            logical += sum(len(tokens[i]) for i in idx) * D * {"float32": 4, "bfloat16": 2, "int8": 1}[dtype]
    elapsed = time.perf_counter() - start
    stats = GradStore.open(uri).stats()
    return {"dtype": dtype, "codec": codec, "examples": n, "seconds": elapsed, "examples_per_s": n / elapsed,
            "logical_MB_per_s": logical / elapsed / 1e6, "bf16_equiv_MB_per_s": stats.rows * D * 2 / elapsed / 1e6,
            "stored_bytes_per_example": stats.bytes_on_disk / n, "compression_ratio": stats.compression_ratio,
            "segments": stats.segments}


def latency(fn, ids_pool: list, q: int, trials: int, rng: np.random.Generator) -> dict:
    times = []
    for _ in range(trials):
        ids = [ids_pool[i] for i in rng.choice(len(ids_pool), size=q, replace=False)]
        t = time.perf_counter()
        fn(ids)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "trials": trials}


def zarr_python_reader(store: GradStore):
    import zarr

    arrays, index = {}, store._index  # the benchmark reaches inside to read the very same arrays

    def read(ids):
        out = []
        for i in ids:
            segment, pos = index.locate[i]
            if segment not in arrays:
                arrays[segment] = zarr.open_array(store.objects.zarr_store(), path=f"segments/{segment}/rows", mode="r")
            o = index.manifests[segment].row_offsets
            out.append(arrays[segment][int(o[pos]) : int(o[pos + 1])])
        return out

    return read


def tensorstore_reader(store: GradStore):
    try:
        import tensorstore as ts
    except ImportError:
        return None
    arrays, index = {}, store._index

    def read(ids):
        futures = []
        for i in ids:
            segment, pos = index.locate[i]
            if segment not in arrays:
                spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{store.uri}/segments/{segment}/rows"}}
                arrays[segment] = ts.open(spec, read=True).result()
            o = index.manifests[segment].row_offsets
            futures.append(arrays[segment][int(o[pos]) : int(o[pos + 1])].read())
        return [f.result() for f in futures]

    return read


def index_scaling(root: str, n: int) -> dict:
    """10^6-scale index: many examples with small k. Open time and memory of rebuilding the index."""
    uri = f"{root}/index-{n}"
    store = GradStore.create(uri, dim=16, vocab_size=V, dtype="bfloat16")
    rng = np.random.default_rng(0)
    tokens = [rng.choice(V, size=4, replace=False) for _ in range(1000)]
    rows = [torch.randn(4, 16) for _ in range(1000)]
    t = time.perf_counter()
    per_segment = 50_000
    with store.writer() as w:
        for base in range(0, n, per_segment):
            m = min(per_segment, n - base)
            w.append([f"user-{base + j:08d}" for j in range(m)], [tokens[j % 1000] for j in range(m)],
                     [rows[j % 1000] for j in range(m)])
    ingest_s = time.perf_counter() - t
    del store
    gc.collect()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    store = GradStore.open(uri)
    open_s = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ids = [f"user-{j:08d}" for j in range(0, n, 7)]
    lat = latency(lambda q: store.get_many(q), ids, 8, 200, np.random.default_rng(1))
    shutil.rmtree(uri, ignore_errors=True)
    return {"examples": n, "ingest_s": ingest_s, "open_s": open_s, "open_peak_rss_MB": max(rss1 - rss0, 0) / 1024,
            "get_many_8": lat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small stores; minutes")
    parser.add_argument("--scratch", default=None, help="directory for the stores (default: a temp dir)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "store_io.json"))
    parser.add_argument("--parts", nargs="+", default=["ingest", "reads", "index"], choices=["ingest", "reads", "index"],
                        help="which parts to run (default: all)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ks = distinct_token_counts(4096, rng)
    root = tempfile.mkdtemp(prefix="gradstore-bench-", dir=args.scratch)
    ingest_n = 512 if args.quick else 2048
    read_sizes = [2000] if args.quick else [10_000, 100_000]
    index_n = 100_000 if args.quick else 1_000_000
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "k_distribution": {"mean": float(ks.mean()), "p50": float(np.median(ks)), "p99": float(np.percentile(ks, 99))},
              "ingest": [], "reads": [], "index": None}
    print(f"k (distinct tokens of a 512-token text): mean {ks.mean():.0f}, p50 {np.median(ks):.0f}, "
          f"p99 {np.percentile(ks, 99):.0f}; D={D}")
    try:
        print(f"\n== ingest ({ingest_n} examples, batches of 64, ~64 MiB segments)")
        print(f"{'dtype':9} {'codec':11} {'ex/s':>8} {'MB/s':>8} {'bf16 MB/s':>10} {'KB/ex':>8} {'ratio':>6}")
        configs = [("bfloat16", "blosc-zstd"), ("bfloat16", "zstd"), ("bfloat16", "none"), ("float32", "blosc-zstd"),
                   ("int8", "blosc-zstd")]
        for dtype, codec in configs if "ingest" in args.parts else []:
            r = ingest(f"{root}/ingest-{dtype}-{codec}", ingest_n, dtype, codec, rng, ks)
            result["ingest"].append(r)
            print(f"{dtype:9} {codec:11} {r['examples_per_s']:8.0f} {r['logical_MB_per_s']:8.1f} "
                  f"{r['bf16_equiv_MB_per_s']:10.1f} {r['stored_bytes_per_example'] / 1024:8.1f} "
                  f"{r['compression_ratio']:6.3f}")
            shutil.rmtree(f"{root}/ingest-{dtype}-{codec}", ignore_errors=True)

        print("\n== get_many latency (bf16, blosc-zstd; warm local store)")
        print(f"{'store':>8} {'reader':12} {'ids':>4} {'p50 ms':>8} {'p99 ms':>8}")
        for n in read_sizes if "reads" in args.parts else []:
            uri = f"{root}/read-{n}"
            t = time.perf_counter()
            ingest(uri, n, "bfloat16", "blosc-zstd", rng, ks, pool=512)
            build_s = time.perf_counter() - t
            store = GradStore.open(uri)
            ids = store.ids()
            for i in rng.choice(len(ids), size=min(len(ids), 2000), replace=False):  # warm the page cache
                store.get_many([ids[i]])
            readers = {"gradstore": store.get_many, "zarr-python": zarr_python_reader(store)}
            ts_reader = tensorstore_reader(store)
            if ts_reader:
                readers["tensorstore"] = ts_reader
            for name, fn in readers.items():
                for q in (1, 8, 64):
                    if name != "gradstore" and q != 8:
                        continue
                    trials = 300 if q < 64 else 60
                    lat = latency(fn, ids, q, trials if name == "gradstore" else 60, rng)
                    result["reads"].append({"store_examples": n, "reader": name, "ids": q, "build_s": build_s, **lat})
                    print(f"{n:8d} {name:12} {q:4d} {lat['p50_ms']:8.2f} {lat['p99_ms']:8.2f}")
            del store
            shutil.rmtree(uri, ignore_errors=True)

        if "index" in args.parts:
            print(f"\n== index scaling ({index_n} examples, k=4)")
            r = index_scaling(root, index_n)
            result["index"] = r
            print(f"ingest {r['ingest_s']:.1f} s, open (index rebuild) {r['open_s']:.2f} s, "
                  f"+{r['open_peak_rss_MB']:.0f} MB peak RSS, get_many(8) p50 {r['get_many_8']['p50_ms']:.2f} ms "
                  f"p99 {r['get_many_8']['p99_ms']:.2f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out)
    if set(args.parts) != {"ingest", "reads", "index"} and out.exists():  # a partial run updates its parts only
        previous = json.loads(out.read_text())
        result = previous | {key: result[key] for key in ("machine", "k_distribution")} | {
            part: result[part] for part in args.parts}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
