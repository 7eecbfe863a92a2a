"""Run by test_capture_ddp.py under torchrun: DDP training with capture, every rank writing its own segments."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import VOCAB, pad_batch, tiny_gpt2

from gradstore import GradStore
from gradstore_unlearn.capture import GradientCapture

DATA = [{"id": f"ex{i}", "input_ids": [(5 * i + 2 * j) % VOCAB for j in range(3 + i % 4)]} for i in range(15)]  # odd: the sampler pads an epoch with a repeat


def main(uri: str, report_dir: str, fail_rank: int | None = None) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    model = DistributedDataParallel(tiny_gpt2(seed=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sampler = DistributedSampler(DATA, shuffle=True, seed=0)
    loader = DataLoader(DATA, batch_size=2, sampler=sampler, collate_fn=lambda items: items)
    store = GradStore.open(uri)
    capture = GradientCapture(model, store, optimizer=optimizer, writer_name=f"rank{rank}", writer_threads=1)
    if rank == fail_rank:
        def disk_full(*args, **kwargs):
            raise OSError(f"disk full on rank {rank}")

        capture._writers[0].append = disk_full
    with capture:
        for epoch in range(2):
            sampler.set_epoch(epoch)
            capture.epoch = epoch
            for items in loader:
                with capture.batch([x["id"] for x in items]):
                    model(**pad_batch([x["input_ids"] for x in items])).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if fail_rank is not None:
                    capture._queue.join()  # the failure is known before the next batch
    # One file per rank, not stdout: two ranks printing to one pipe can interleave within a line.
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps({"captured": capture.report.examples_captured}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
