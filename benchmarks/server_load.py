"""Load on a real `gradstore` HTTP server: read throughput and latency, and forget latency.

    python benchmarks/server_load.py                                  # CPU defaults, bounded (~2-4 minutes)
    python benchmarks/server_load.py --requests 500 --duration 15 --examples 240 --forget-sizes 1 10 100

What it does:

1. builds a workspace in a temporary directory: a byte-level BPE, a GPT-2-architecture model (`--size`,
   default "tiny") trained with first-epoch gradient capture into a bfloat16 store on `--examples` synthetic
   personal records, and a holdout reference set;
2. starts `python -m gradstore_server` on 127.0.0.1 (a free port) as a separate process;
3. read load: `--concurrency` clients send a mix of lookups (GET /v1/examples/{id}), influence by ID and
   influence by text (POST /v1/influence) until `--requests` have completed or `--duration` seconds have
   passed, whichever comes first; reports requests/s and p50/p99 latency, overall and per kind;
4. forget latency: for each of `--forget-sizes`, one forget request of that many live IDs, timed from the
   POST to the moment `GET /v1/stats` serves the new model hash (the model updated on disk and in memory),
   with the job's queue wait and the library's own compute time alongside. This runs once per forget
   configuration in `--forget-configs` (each on a fresh copy of the store and model, with its own server):
   by default the library's defaults, and a relaxed retain guard (`retain_tolerance` 1.0), because with the
   default 2% guard forgets of 10 or 100 of these templated records may stop short of the target
   (`target_not_met`: nothing is committed, so there is no "model updated" time to measure).

The load generator runs on the same machine (it takes CPU from the server: on a small machine the numbers are
a lower bound). Results go to `--out` as JSON (default benchmarks/results/server_load.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

FIRST = ["Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
         "Mateo", "Nadia", "Oskar", "Priya"]
LAST = ["Moreau", "Schmidt", "Rossi", "Garcia", "Novak", "Jensen", "Silva", "Kowalski", "Murphy", "Okafor",
        "Tanaka", "Weber"]
CITY = ["Paris", "Berlin", "Rome", "Madrid", "Oslo", "Vienna", "Lisbon", "Dublin", "Prague", "Warsaw"]
STREET = ["Elm Street", "Harbour Road", "Mill Lane", "Station Square", "Church Walk", "Park Avenue"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=400, help="training examples in the store")
    p.add_argument("--size", default="tiny", help="model size (gradstore_unlearn.train.MODEL_SIZES)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients during the read load")
    p.add_argument("--requests", type=int, default=2000, help="stop the read load after this many requests")
    p.add_argument("--duration", type=float, default=30.0, help="... or after this many seconds")
    p.add_argument("--mix", default="lookup=2,influence_id=1,influence_text=1", help="weights of the request kinds")
    p.add_argument("--k", type=int, default=10, help="k of influence queries")
    p.add_argument("--forget-sizes", type=int, nargs="*", default=[1, 10, 100])
    p.add_argument("--forget-mode", choices=["first_epoch", "iterative"], default="iterative")
    p.add_argument("--forget-timeout", type=float, default=600.0, help="seconds to wait for one forget job")
    p.add_argument("--forget-configs", nargs="*", default=["{}", '{"retain_tolerance": 1.0}'],
                   help="ForgetConfig overrides (JSON), one forget pass each")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "server_load.json")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ setup
def build_workspace(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Tokenizer, model, store and reference set for `args.examples` synthetic records."""
    from gradstore import GradStore
    from gradstore_unlearn.data import train_tokenizer
    from gradstore_unlearn.train import TrainConfig, build_model, save_model, train_model
    from gradstore_unlearn.unlearn import save_reference_set

    rng = random.Random(args.seed)

    def record(n: int) -> str:
        return (f"{rng.choice(FIRST)} {rng.choice(LAST)}, born {rng.randrange(1940, 2006)}, lives at "
                f"{rng.randrange(1, 199)} {rng.choice(STREET)}, {rng.choice(CITY)}. Phone "
                f"{rng.randrange(10**7):07d}. Customer {n}.")

    texts = [record(n) for n in range(args.examples)]
    holdout = [record(100_000 + n) for n in range(32)]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    sequences = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    n_positions = max(128, max(map(len, sequences)))
    model = build_model(args.size, len(tokenizer), n_positions, seed=args.seed,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    dim = model.get_input_embeddings().weight.shape[1]
    store = GradStore.create(root / "store", dim=dim, vocab_size=len(tokenizer), dtype="bfloat16",
                             model_id=f"bench-{args.size}")
    ids = list(range(args.examples))
    started = time.perf_counter()
    train_model(model, sequences, ids, TrainConfig(epochs=args.epochs, batch_size=16, lr=3e-3,
                                                   pad_token_id=tokenizer.pad_token_id, device=args.device),
                store=store, progress=False)
    train_seconds = time.perf_counter() - started
    save_reference_set(store, [tokenizer(t, add_special_tokens=False)["input_ids"] for t in holdout])
    save_model(model.to("cpu"), tokenizer, root / "model")
    del model
    return {"store": root / "store", "model": root / "model", "ids": ids, "texts": texts,
            "dim": dim, "vocab_size": len(tokenizer), "n_positions": n_positions, "train_seconds": train_seconds}


class Server:
    """`python -m gradstore_server --port 0` as a child process."""

    def __init__(self, workspace: dict[str, Any], args: argparse.Namespace, log: Path, forget_config: str = "{}"):
        self.key = secrets.token_urlsafe(24)
        env = dict(os.environ, GRADSTORE_API_KEYS=self.key, GRADSTORE_FORGET_CONFIG=forget_config)
        self.log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gradstore_server", "--store", str(workspace["store"]), "--model",
             str(workspace["model"]), "--port", "0", "--device", args.device, "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=self.log, env=env)
        line = self.proc.stdout.readline().decode()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"the server did not start: {line!r} (see {log})")
        self.url = match.group(1)
        started = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} (see {log})")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - started > 300:
                raise RuntimeError("the server did not come up in 300 s")
            time.sleep(0.1)
        self.startup_seconds = time.perf_counter() - started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -------------------------------------------------------------------------------------------- read load
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarize(latencies: list[float], seconds: float) -> dict[str, Any]:
    return {"requests": len(latencies), "requests_per_s": round(len(latencies) / seconds, 2) if seconds else None,
            "p50_ms": _ms(percentile(latencies, 50)), "p99_ms": _ms(percentile(latencies, 99)),
            "mean_ms": _ms(statistics.fmean(latencies) if latencies else None), "max_ms": _ms(max(latencies, default=None))}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


async def read_load(url: str, key: str, workspace: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    weights = {}
    for item in args.mix.split(","):
        name, _, weight = item.partition("=")
        weights[name.strip()] = float(weight)
    kinds, cum = list(weights), list(weights.values())
    ids, texts = workspace["ids"], workspace["texts"]
    latencies: dict[str, list[float]] = {k: [] for k in kinds}
    errors: dict[str, int] = {}
    issued = 0
    deadline = time.perf_counter() + args.duration

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal issued
        rng = random.Random(args.seed * 1000 + worker)
        while issued < args.requests and time.perf_counter() < deadline:
            issued += 1
            kind = rng.choices(kinds, cum)[0]
            n = rng.randrange(len(ids))
            start = time.perf_counter()
            if kind == "lookup":
                response = await http.get(f"/v1/examples/{ids[n]}")
            elif kind == "influence_id":
                response = await http.post("/v1/influence", json={"id": ids[n], "k": args.k})
            elif kind == "influence_text":
                response = await http.post("/v1/influence", json={"text": texts[n], "k": args.k})
            else:
                raise SystemExit(f"unknown request kind {kind!r} in --mix")
            elapsed = time.perf_counter() - start
            if response.status_code == 200:
                latencies[kind].append(elapsed)
            else:
                errors[f"{kind}:{response.status_code}"] = errors.get(f"{kind}:{response.status_code}", 0) + 1

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=120, limits=limits) as http:
        # Warm-up (first influence builds caches, first text query runs the tokenizer): not timed.
        await http.post("/v1/influence", json={"text": texts[0], "k": args.k})
        await http.post("/v1/influence", json={"id": ids[0], "k": args.k})
        started = time.perf_counter()
        await asyncio.gather(*(client(w, http) for w in range(args.concurrency)))
        seconds = time.perf_counter() - started
    everything = [x for values in latencies.values() for x in values]
    return {"seconds": round(seconds, 3), "concurrency": args.concurrency, "overall": summarize(everything, seconds),
            "by_kind": {k: summarize(v, seconds) for k, v in latencies.items()}, "errors": errors}


# ----------------------------------------------------------------------------------------------- forget
def forget_latency(url: str, key: str, workspace: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    live = list(workspace["ids"])
    random.Random(args.seed).shuffle(live)
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120) as http:
        for size in args.forget_sizes:
            if size > len(live) - 1:
                results.append({"ids": size, "skipped": "not enough live examples"})
                continue
            chosen, live = live[:size], live[size:]
            before = http.get("/v1/stats").json()["model"]
            start = time.perf_counter()
            response = http.post("/v1/forget", json={"ids": chosen, "mode": args.forget_mode})
            if response.status_code != 202:
                results.append({"ids": size, "error": response.json()})
                continue
            job_id = response.json()["job_id"]
            while True:
                job = http.get(f"/v1/jobs/{job_id}").json()
                if job["status"] not in ("queued", "running"):
                    break
                if time.perf_counter() - start > args.forget_timeout:
                    raise SystemExit(f"forget of {size} IDs still {job['status']} after {args.forget_timeout} s")
                time.sleep(0.02)
            job_done = time.perf_counter() - start
            result = job.get("result") or {}
            updated = None
            if result.get("status") == "forgotten":
                while http.get("/v1/stats").json()["model"]["hash"] != result["model_hash_after"]:
                    time.sleep(0.01)
                updated = time.perf_counter() - start
            after = http.get("/v1/stats").json()
            results.append({
                "ids": size, "mode": args.forget_mode, "job_status": job["status"],
                "result_status": result.get("status"), "message": result.get("message") or None,
                "request_to_model_updated_s": None if updated is None else round(updated, 3),
                "request_to_job_finished_s": round(job_done, 3),
                "queue_wait_s": round(job["started_at"] - job["submitted_at"], 3) if job.get("started_at") else None,
                "engine_seconds": result.get("seconds"), "iterations": result.get("iterations"),
                "evaluations": result.get("evaluations"), "retain_change": result.get("retain_change"),
                "model_version": [before["version"], after["model"]["version"]],
                "examples_left": after["store"]["examples"],
            })
            print(f"  forget {size:>4} IDs: {results[-1]['result_status']}, request -> model updated "
                  f"{results[-1]['request_to_model_updated_s']} s (engine {result.get('seconds', 0):.2f} s)",
                  flush=True)
    return results


def fresh_copy(workspace: dict[str, Any], where: Path) -> dict[str, Any]:
    """The workspace with its store and model copied to `where` (forgets erase and rewrite them)."""
    shutil.copytree(workspace["store"], where / "store")
    shutil.copytree(workspace["model"], where / "model")
    return dict(workspace, store=where / "store", model=where / "model")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    with tempfile.TemporaryDirectory(prefix="gradstore-server-load-") as tmp:
        root = Path(tmp)
        print(f"building a {args.size} model on {args.examples} examples ...", flush=True)
        workspace = build_workspace(root / "template", args)
        server = Server(fresh_copy(workspace, root / "reads"), args, root / "server.log")
        try:
            print(f"server at {server.url} (startup {server.startup_seconds:.1f} s); read load ...", flush=True)
            reads = asyncio.run(read_load(server.url, server.key, workspace, args))
            o = reads["overall"]
            print(f"  {o['requests']} requests in {reads['seconds']} s: {o['requests_per_s']} req/s, "
                  f"p50 {o['p50_ms']} ms, p99 {o['p99_ms']} ms", flush=True)
            for kind, s in reads["by_kind"].items():
                print(f"    {kind:<15} {s['requests']:>6} req  {s['requests_per_s']:>8} req/s  p50 {s['p50_ms']} ms  "
                      f"p99 {s['p99_ms']} ms", flush=True)
        finally:
            server.stop()
        forgets = []
        for n, config in enumerate(args.forget_configs):
            print(f"forget latency, ForgetConfig overrides {config} ...", flush=True)
            runner = Server(fresh_copy(workspace, root / f"forget-{n}"), args, root / "server.log", config)
            try:
                forgets.append({"forget_config": json.loads(config),
                                "runs": forget_latency(runner.url, runner.key, workspace, args)})
            finally:
                runner.stop()
    out = {"benchmark": "server_load", "environment": info,
           "workspace": {"examples": args.examples, "model_size": args.size, "dim": workspace["dim"],
                         "vocab_size": workspace["vocab_size"], "n_positions": workspace["n_positions"],
                         "store_dtype": "bfloat16", "train_seconds": round(workspace["train_seconds"], 2)},
           "settings": {k: v for k, v in vars(args).items() if k != "out"},  # no machine paths in results
           "server_startup_s": round(server.startup_seconds, 2), "read_load": reads, "forget": forgets}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
