#!/usr/bin/env python3
"""Peer benchmark for the face-gallery index: faiss-cpu IndexFlatIP and IndexHNSWFlat.

Measures what the gallery's HNSW index is judged on, with faiss as the reference:
exact search (IndexFlatIP) and HNSW (IndexHNSWFlat, inner product) over N unit 512-d
float32 vectors; build time, memory (RSS delta of the process), batch-1 top-k latency
(median, ms), recall@k against the flat index and recall@1 (the first result is the
exact nearest neighbour), for random queries and for near-duplicate queries (a stored
vector plus small Gaussian noise, renormalised: a face seen again).

Usage:
    python3 -m venv ~/.cache/mfn-peer-bench-venv
    ~/.cache/mfn-peer-bench-venv/bin/pip install faiss-cpu numpy
    ~/.cache/mfn-peer-bench-venv/bin/python bench/gallery_faiss.py \
        --n 100000 --threads 1,2 --m 16 --ef-construction 200 --ef-search 64,128 \
        --json gallery-faiss-1e5.json

    # the same data the Rust side used (raw little-endian f32 or .npy, d columns):
    ... bench/gallery_faiss.py --vectors base.f32 --queries q_rand.f32 \
        --dup-queries q_dup.f32 --threads 2 --search-threads 1,2

Options:
    --n N                  vectors to generate when --vectors is not given (100000)
    --d D                  dimension (512)
    --seed S               numpy default_rng seed for generated data (42)
    --nq Q                 queries to generate when --queries is not given (1000)
    --noise SIGMA          per-component noise of the near-duplicate queries (0.02,
                           cosine to the stored vector about 0.91 at d=512)
    --vectors PATH         stored vectors, .npy or raw f32 (row-major, d per row)
    --queries PATH         random queries, same formats
    --dup-queries PATH     near-duplicate queries, same formats
    --dup-name NAME        what to call that query set in the output ("near-dup"; "lfw"
                           for the held-out LFW faces of examples/scale_bench.rs)
    --threads LIST         faiss.omp_set_num_threads for each build (e.g. 1,2); the
                           indexes are rebuilt for each value
    --search-threads LIST  concurrent callers issuing batch-1 searches (default: the
                           build's thread count); faiss releases the GIL in search
    --m M, --ef-construction E, --ef-search LIST   HNSW parameters (16, 200, 64,128)
    --k K                  neighbours per query (10)
    --skip-hnsw            only the flat index
    --search-omp N         faiss.omp_set_num_threads(N) before the searches (default: keep
                           the build's count; a batch-1 search runs on one thread anyway,
                           and OpenMP's spin-up only adds to it)
    --flat-queries N       time only the first N queries of each set on the flat index
                           (its ground truth is still computed for all of them)
    --rounds R             repeat the search measurements R times (1)
    --json OUT             write every result row to OUT

Every vector and query is L2-normalised before use, so inner product is cosine.
"""

import argparse
import json
import os
import platform
import statistics
import threading
import time

import numpy as np

import faiss


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def load_matrix(path, d):
    if path.endswith(".npy"):
        x = np.load(path)
    else:
        x = np.fromfile(path, dtype="<f4")
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, d)
    return x


def normalise(x):
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_data(args):
    rng = np.random.default_rng(args.seed)
    if args.vectors:
        base = load_matrix(args.vectors, args.d)
    else:
        base = rng.standard_normal((args.n, args.d), dtype=np.float32)
    normalise(base)
    n = base.shape[0]
    if args.queries:
        q_rand = load_matrix(args.queries, args.d)
    else:
        q_rand = rng.standard_normal((args.nq, args.d), dtype=np.float32)
    normalise(q_rand)
    if args.dup_queries:
        q_dup = load_matrix(args.dup_queries, args.d)
    else:
        nq = q_rand.shape[0]
        src = (np.arange(nq) * (n // nq)) % n
        q_dup = base[src] + args.noise * rng.standard_normal((nq, args.d), dtype=np.float32)
    normalise(q_dup)
    return base, {"random": q_rand, args.dup_name: q_dup}


def batch1(index, queries, k, callers):
    """Batch-1 searches from `callers` threads; per-query ms, ids, wall s."""
    nq = queries.shape[0]
    ids = np.zeros((nq, k), dtype=np.int64)
    lat = [0.0] * nq
    for i in range(min(50, nq)):  # warm-up
        index.search(queries[i : i + 1], k)

    def work(t):
        for i in range(t, nq, callers):
            t0 = time.perf_counter()
            _, I = index.search(queries[i : i + 1], k)
            lat[i] = (time.perf_counter() - t0) * 1e3
            ids[i] = I[0]

    t0 = time.perf_counter()
    if callers == 1:
        work(0)
    else:
        ths = [threading.Thread(target=work, args=(t,)) for t in range(callers)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
    return lat, ids, time.perf_counter() - t0


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return ""


def recall(ids, gt, k):
    hit = sum(len(set(a[:k]) & set(b[:k])) for a, b in zip(ids.tolist(), gt.tolist()))
    return hit / (gt.shape[0] * k)


def recall1(ids, gt):
    """Share of queries whose first result is the exact nearest neighbour."""
    return float(np.mean(ids[:, 0] == gt[:, 0]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=0.02)
    ap.add_argument("--vectors")
    ap.add_argument("--queries")
    ap.add_argument("--dup-queries")
    ap.add_argument("--dup-name", default="near-dup")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--search-threads")
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--ef-search", default="64,128")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--skip-hnsw", action="store_true")
    ap.add_argument("--search-omp", type=int)
    ap.add_argument("--flat-queries", type=int)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()

    base, queries = make_data(args)
    n, d, k = base.shape[0], args.d, args.k
    efs = [int(x) for x in args.ef_search.split(",")]
    print(f"faiss {faiss.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus; n={n} d={d} k={k} queries: "
          + ", ".join(f"{name} {q.shape[0]}" for name, q in queries.items()))
    rows = []

    def emit(row):
        rows.append(row)
        print("  ".join(f"{key}={val}" for key, val in row.items()), flush=True)

    for threads in [int(x) for x in args.threads.split(",")]:
        faiss.omp_set_num_threads(threads)
        callers_list = [int(x) for x in (args.search_threads or str(threads)).split(",")]

        r0 = rss_mb()
        t0 = time.perf_counter()
        flat = faiss.IndexFlatIP(d)
        flat.add(base)
        flat_build = time.perf_counter() - t0
        flat_mem = rss_mb() - r0
        gts = {name: flat.search(q, k)[1] for name, q in queries.items()}  # exact, batched
        indexes = [("faiss-flat-ip", flat, flat_build, flat_mem, [None])]

        if not args.skip_hnsw:
            r0 = rss_mb()
            t0 = time.perf_counter()
            hnsw = faiss.IndexHNSWFlat(d, args.m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = args.ef_construction
            hnsw.add(base)
            hnsw_build = time.perf_counter() - t0
            hnsw_mem = rss_mb() - r0
            print(f"faiss-hnsw-flat M {args.m} efConstruction {args.ef_construction}: built in "
                  f"{hnsw_build:.1f} s on {threads} threads, load {loadavg()}", flush=True)
            indexes.append(("faiss-hnsw-flat", hnsw, hnsw_build, hnsw_mem, efs))

        if args.search_omp:
            faiss.omp_set_num_threads(args.search_omp)
        for rnd, (engine, index, build_s, mem, ef_list) in (
                (r, ix) for r in range(1, args.rounds + 1) for ix in indexes):
            for ef in ef_list:
                if ef is not None:
                    index.hnsw.efSearch = ef
                for qname, q in queries.items():
                    if ef is None and args.flat_queries:
                        q = q[: args.flat_queries]
                    for callers in callers_list:
                        lat, ids, wall = batch1(index, q, k, callers)
                        emit({
                            "engine": engine, "round": rnd, "load": loadavg(),
                            "n": n, "d": d, "threads": threads,
                            "search_omp": args.search_omp or threads,
                            "search_threads": callers,
                            "M": args.m if ef is not None else None,
                            "ef_construction": args.ef_construction if ef is not None else None,
                            "ef_search": ef, "queries": qname, "k": k,
                            "build_s": round(build_s, 2), "rss_delta_mb": round(mem, 1),
                            "median_ms": round(statistics.median(lat), 4),
                            "qps": round(q.shape[0] / wall, 1),
                            f"recall{k}": round(recall(ids, gts[qname][: len(ids)], k), 4),
                            "recall1": round(recall1(ids, gts[qname][: len(ids)]), 4),
                        })
        del indexes, flat
        if not args.skip_hnsw:
            del hnsw

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"faiss": faiss.__version__, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
