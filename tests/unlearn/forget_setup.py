"""A small world for the engine tests: synthetic personal records, a tiny GPT-2 that memorises them.

Each record is a shared template, a three-token "name" and a four-token "secret" drawn from a small digit
alphabet; the model trains until it knows its records (loss ~0.25) and not unseen ones (~3.5). Built in
about two seconds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import transformers

from gradstore import GradStore
from gradstore_unlearn.train import TrainConfig, train_model
from gradstore_unlearn.unlearn import save_reference_set

VOCAB = 96
TEMPLATE = [2, 3, 4, 5]


def record(i: int) -> list[int]:
    r = random.Random(i)
    name = [r.randrange(20, VOCAB) for _ in range(3)]
    secret = [r.randrange(10, 20) for _ in range(4)]
    return [1, *TEMPLATE, *name, 6, 7, *secret, 8, name[0], 0]


@dataclass
class World:
    model: transformers.GPT2LMHeadModel
    store: GradStore
    train: dict[str, list[int]]
    holdout: list[list[int]]  # never trained: half is the store's reference set, half judges results
    judge: list[list[int]]


def tiny_model(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def build_world(path, n_train: int = 40, n_holdout: int = 20, epochs: int = 60) -> World:
    records = [record(i) for i in range(n_train + n_holdout)]
    train = {f"r{i}": records[i] for i in range(n_train)}
    model = tiny_model()
    store = GradStore.create(path, dim=32, vocab_size=VOCAB, dtype="float32", model_id="tiny-test")
    train_model(model, list(train.values()), list(train), TrainConfig(epochs=epochs, batch_size=8, lr=1e-2,
                pad_token_id=0, warmup_steps=5), store=store, progress=False)
    holdout = records[n_train:]
    save_reference_set(store, holdout[: n_holdout // 2])
    return World(model, store, train, holdout, holdout[n_holdout // 2 :])


def forget_records(store) -> list[dict]:
    """The store's audit records of committed forgets (training also writes one: `trained`, the chain's start)."""
    return [r for r in store.audit_log() if r.get("kind") == "forget"]
