"""Batches built ahead of the step (issue 29): one background thread iterates the loader (its numpy gathers release
the GIL while the model step runs in torch), `depth` batches ahead, in the loader's order (one producer, FIFO: the
order and so the run stay deterministic). On CUDA the batch is pinned and copied with non_blocking=True.

    for batch in prefetch(loader, depth=2, device=device): ...     # depth 0: the loader itself, same batches
"""
from __future__ import annotations

import queue
import threading

import torch

_END = object()


def _pin(batch):
    return {k: (_pin(v) if isinstance(v, dict) else v.pin_memory()) for k, v in batch.items()}


def _to(batch, device):
    return {k: (_to(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True)) for k, v in batch.items()}


def prefetch(batches, depth: int = 2, device: torch.device | str | None = None):
    """Yield the batches of `batches` (on `device` when given), built by a background thread `depth` ahead."""
    device = torch.device(device) if device is not None else None
    cuda = device is not None and device.type == "cuda"

    def ready(b):
        if device is None:
            return b
        return _to(_pin(b) if cuda else b, device)

    if depth <= 0:
        for b in batches:
            yield ready(b)
        return
    q: queue.Queue = queue.Queue(maxsize=int(depth))
    stop = threading.Event()

    def work():
        try:
            for b in batches:
                item = ready(b)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:          # raised again in the consumer
            q.put(e)

    t = threading.Thread(target=work, name="twinv2-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)
