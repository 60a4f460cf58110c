"""Distributed data parallel through torch.distributed, launched by torchrun (or spawned in tests).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them (or with
WORLD_SIZE=1) everything runs in one process. Backend: NCCL on CUDA, gloo on CPU. Every rank reads
every-world-th batch of the same seeded order (samples.BatchOrder); DDP averages the gradients.

One node or many (docs/scaling.md, "Multi-node training"): torchrun's c10d rendezvous gives the ranks;
this module sees only the environment. A lost peer (a node killed, the network dropped) must not hang
the others: every collective has a timeout (`timeout_s`, else $TWINV2_DIST_TIMEOUT_S, else
DEFAULT_TIMEOUT_S), and `guard` turns a collective's failure into PeerLost, one message that names the
rank, the lost process group and the checkpoint to resume from.
"""
from __future__ import annotations

import datetime
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from twinv2.errors import EXIT_OS, TwinV2Error


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float | None = None       # the collective timeout when distributed

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


TIMEOUT_ENV = "TWINV2_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0    # a collective waits at most this long for a silent peer (torch's gloo default: 30 min)


class PeerLost(TwinV2Error):
    """A collective failed or timed out: another rank of the process group is gone (node killed, network
    dropped, or stuck longer than the timeout). Relaunch every node with --resume. Exit code 5 (an
    operating-system/network failure, README "Exit codes")."""

    exit_code = EXIT_OS


def timeout_s(value: float | str | None = None) -> float:
    """The collective timeout: `value`, else $TWINV2_DIST_TIMEOUT_S, else DEFAULT_TIMEOUT_S (> 0)."""
    raw = value if value is not None else os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S
    try:
        t = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0") from None
    if not t > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return t


def setup(device: str | None = None, timeout: float | None = None) -> DistInfo:
    """Join the process group if launched with WORLD_SIZE > 1; pick the device (cuda:LOCAL_RANK or cpu).
    `timeout` (seconds; default timeout_s()) bounds every collective, so a lost peer fails the others."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else str(device).startswith("cuda")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        t = timeout_s(timeout)
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=t))
        print(f"twinv2 ddp: rank {rank}/{world} (local rank {local}, node {os.environ.get('GROUP_RANK', '?')}) "
              f"joined: backend {backend}, collective timeout {t:g}s", file=sys.stderr, flush=True)
        return DistInfo(rank, world, local, dev, t)
    return DistInfo(rank, world, local, dev)


def _collective_failure(e: BaseException) -> bool:
    if isinstance(e, getattr(dist, "DistError", ())):
        return True                                   # DistBackendError / DistNetworkError / DistStoreError
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in msg for w in (
        "gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out", "socket", "peer"))


@contextmanager
def guard(info: DistInfo, checkpoints: str | Path | None = None):
    """Run the body; when distributed and a collective fails (a peer is lost), raise PeerLost naming this
    rank, the cause, and the newest checkpoint to resume from, instead of a backend's raw error."""
    try:
        yield
    except PeerLost:
        raise
    except Exception as e:
        if not (info.enabled and _collective_failure(e)):
            raise
        from twinv2.training.checkpoint import latest_checkpoint

        last = latest_checkpoint(checkpoints) if checkpoints is not None and Path(checkpoints).is_dir() else None
        cause = " ".join(str(e).split())[:400]
        where = (f"The newest checkpoint is {last}: relaunch every node with the same command plus --resume"
                 if last else "No checkpoint was written yet: relaunch every node with the same command")
        raise PeerLost(f"distributed training lost a peer: rank {info.rank} of {info.world} (node "
                       f"{os.environ.get('GROUP_RANK', '?')}, process-group store {os.environ.get('MASTER_ADDR', '?')}:"
                       f"{os.environ.get('MASTER_PORT', '?')}) saw a collective fail (collective timeout "
                       f"{info.timeout_s or timeout_s():g}s; {type(e).__name__}: {cause}): another node was "
                       f"killed or failed (see its log), lost its network or stalled. {where}.") from e


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DDP-wrap the model when distributed. Unused parameters are allowed: a GSU's top-k leaves some
    embedding rows and (for hash-based GSUs) some modules out of a step."""
    if not info.enabled:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
