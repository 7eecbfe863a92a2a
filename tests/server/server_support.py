"""Helpers of the server tests: the tiny model + store template, workspaces, a live server, job polling.

The template is a 1-layer GPT-2 (32-dim embeddings) trained for a few epochs on synthetic personal records
tokenised by a small byte-level BPE, with first-epoch gradients captured into a float32 store and a holdout
reference set saved in it. Building it takes a few seconds; each test gets its own copy of the directory.

(A module of its own, imported as `server_support`: test modules cannot import from `conftest`, whose module
name every test directory's conftest.py shares.)
"""

from __future__ import annotations

import random
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

API_KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-fedcba9876543210"
# These tests are about the server, not about calibration: with the retain guard relaxed, every forget on
# the tiny model reaches its target and commits (weights saved, examples erased), whatever the engine's
# calibration does on a 44-example store. Calibration quality is tested with the engine.
COMMIT_FORGET = {"retain_tolerance": 5.0}
# ...and a forget that calibrates to a very tight band, one example per forward pass: a second or more instead of
# a fraction, long enough for readers (and a SIGKILL) to land while it runs. (In batches of 32, a fast 2-core CPU
# finished it before a SIGKILL sent as soon as the job was seen running.)
SLOW_FORGET = {**COMMIT_FORGET, "target_tolerance": 0.0005, "bisect_steps": 30, "batch_size": 1}

FIRST = ["Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena"]
LAST = ["Moreau", "Schmidt", "Rossi", "Garcia", "Novak", "Jensen", "Silva", "Kowalski", "Murphy", "Okafor"]
CITY = ["Paris", "Berlin", "Rome", "Madrid", "Oslo", "Vienna", "Lisbon", "Dublin"]
STREET = ["Elm Street", "Harbour Road", "Mill Lane", "Station Square"]
# Integer IDs 0..31, then string IDs, including one ("3") that spells an integer ID, one with a slash and
# one that is not ASCII: the URL rules for IDs are tested on them.
STR_IDS = [f"rec-{i}" for i in range(9)] + ["3", "user/42", "émile"]


def record(rng: random.Random, serial: int) -> str:
    return (f"{rng.choice(FIRST)} {rng.choice(LAST)} lives at {rng.randrange(1, 99)} {rng.choice(STREET)}, "
            f"{rng.choice(CITY)}. Phone {rng.randrange(10**6):06d}. Ref {serial}.")


@dataclass(frozen=True)
class Template:
    root: Path
    ids: list[Any]
    texts: dict[Any, str]
    holdout: list[str]

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def model(self) -> Path:
        return self.root / "model"


def build_template(root: Path, capture_policy: str = "first") -> Template:
    import torch
    import transformers

    from gradstore import GradStore
    from gradstore_unlearn.data import train_tokenizer
    from gradstore_unlearn.train import TrainConfig, save_model, train_model
    from gradstore_unlearn.unlearn import save_reference_set

    rng = random.Random(1234)
    ids: list[Any] = list(range(32)) + STR_IDS
    texts = {example_id: record(rng, n) for n, example_id in enumerate(ids)}
    holdout = [record(rng, 1000 + n) for n in range(12)]
    tokenizer = train_tokenizer(list(texts.values()), vocab_size=300)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    sequences = [encode(texts[i]) for i in ids]
    assert max(map(len, sequences)) <= 64
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
    model = transformers.GPT2LMHeadModel(config)
    store = GradStore.create(root / "store", dim=32, vocab_size=len(tokenizer), dtype="float32",
                             model_id="tiny", capture_policy=capture_policy)
    train_model(model, sequences, ids, TrainConfig(epochs=6, batch_size=8, lr=1e-2, warmup_steps=5,
                                                   pad_token_id=tokenizer.pad_token_id),
                store=store, progress=False)
    save_reference_set(store, [encode(t) for t in holdout])
    save_model(model, tokenizer, root / "model")
    return Template(root, ids, texts, holdout)


@dataclass(frozen=True)
class Workspace:
    store: Path
    model: Path
    template: Template

    def settings(self, **overrides: Any) -> Any:
        from gradstore_server import Settings

        values: dict[str, Any] = {"store": str(self.store), "model": str(self.model), "api_keys": (API_KEY, OTHER_KEY),
                                  "forget_config": dict(COMMIT_FORGET)}
        values.update(overrides)
        return Settings(**values)


def copy_template(template: Template, where: Path) -> Workspace:
    shutil.copytree(template.store, where / "store")
    shutil.copytree(template.model, where / "model")
    return Workspace(where / "store", where / "model", template)


def wait_job(client: Any, job_id: str, timeout: float = 60.0, headers: dict[str, str] | None = None) -> dict:
    """Poll a job until it finishes; returns its final JSON."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/jobs/{job_id}", headers=headers)
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] not in ("queued", "running"):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")
        time.sleep(0.05)


class LiveServer:
    """A real uvicorn server on 127.0.0.1 (free port) in a background thread of this process."""

    def __init__(self, settings: Any):
        import uvicorn

        from gradstore_server import create_app

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def forget_records(store) -> list[dict]:
    """The store's audit records of committed forgets (training also writes one: `trained`, the chain's start)."""
    return [r for r in store.audit_log() if r.get("kind") == "forget"]
