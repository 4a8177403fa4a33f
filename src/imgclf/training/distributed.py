"""Training on several processes, GPUs or machines: PyTorch DDP under ``torchrun``.

The trainer's single-process path calls the helpers here at a few points; each
one does nothing (or the obvious thing) when the process is not one rank of a
``torchrun`` job, so a reader of the trainer sees the single-process path first.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment):

- the process group starts with NCCL on CUDA and gloo on the CPU, and
  ``LOCAL_RANK`` picks each rank's GPU (``--device`` keeps its meaning per rank);
- feature extraction is split: each rank runs the backbone over every
  WORLD_SIZE-th image and the results are gathered back into input order, so
  every rank trains the same head on the same features as one process would;
- fine-tuning wraps the network in ``DistributedDataParallel`` and gives each
  rank a disjoint shard through a ``DistributedSampler`` (``set_epoch`` each
  epoch); evaluation splits the images without padding and gathers the
  predictions, so no image is counted twice;
- only rank 0 writes files (model, metrics, checkpoints) or the console report.

``launch`` is what ``imgclf train --nproc-per-node N`` uses: PyTorch's own
elastic launcher (what ``torchrun`` runs), so there is no launcher of ours.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from imgclf.errors import DistributedRunError, OptionError, TrainingInterrupted
from imgclf.options import COMMANDS, check

if TYPE_CHECKING:
    import torch

#: Set for the ranks that ``launch`` starts: they leave error and interruption
#: messages to the launcher, which prints exactly one.
LAUNCHED_ENV = "IMGCLF_LAUNCHED_BY_IMGCLF"


def world_size() -> int:
    """How many processes train together (1 outside ``torchrun``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 outside ``torchrun``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """True on rank 0 and in a single process: the one that writes files and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def under_torchrun() -> bool:
    """True in a process that torchrun (or ``launch``) started, even a job of one."""
    return "LOCAL_RANK" in os.environ


def launched_by_imgclf() -> bool:
    return os.environ.get(LAUNCHED_ENV) == "1"


def local_device(device: str) -> str:
    """``--device`` for this rank: a plain ``cuda`` becomes this rank's GPU (``LOCAL_RANK``)."""
    if device == "cuda" and is_distributed():
        import torch

        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= gpus:
            raise OptionError(f"local rank {local_rank} has no GPU of its own: this machine has {gpus}; "
                              f"start at most {gpus} processes per node, or use --device cpu")  # fmt: skip
        return f"cuda:{local_rank}"
    return device


def setup(device: str) -> None:
    """Join the job's process group, once: NCCL for CUDA, gloo otherwise.

    Does nothing outside ``torchrun``. The group is left at interpreter exit
    (``shutdown``), so a rank that returns early does not hang the others.
    """
    import atexit
    import datetime

    import torch
    import torch.distributed as dist

    if not is_distributed():
        return
    if not dist.is_available():
        raise OptionError("this PyTorch build has no torch.distributed; train in one process")
    if dist.is_initialized():  # the caller's own group (a script run under torchrun)
        return
    backend = "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        backend = "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    atexit.register(shutdown)


def shutdown() -> None:
    """Leave the process group (safe to call more than once)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def backend_name() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def shard_indices(n: int) -> range:
    """This rank's share of ``n`` items, without padding: every ``world_size``-th one."""
    return range(rank(), n, world_size())


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (just ``[obj]`` in one process)."""
    import torch.distributed as dist

    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a checkpoint read on rank 0, say)."""
    import torch.distributed as dist

    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Rows computed for :func:`shard_indices` ``(n)`` on each rank, put back in input order."""
    import torch

    if world_size() == 1:
        return rows
    parts = gather_objects(rows.cpu())
    out = torch.empty((n, *rows.shape[1:]), dtype=rows.dtype)
    for r, part in enumerate(parts):
        out[r :: len(parts)] = part
    return out.to(rows.device)


def sum_across(*values: float) -> list[float]:
    """Each value summed over the ranks (train accuracy and loss counts)."""
    if world_size() == 1:
        return list(values)
    return [sum(column) for column in zip(*gather_objects(list(values)))]


def extract_sharded(extractor, images: Sequence):
    """``extractor.transform(images)``, split across the ranks and gathered back in input
    order: every rank ends with the result one process would have computed."""
    from imgclf.nets.features import ExtractionResult

    if world_size() == 1:
        return extractor.transform(images)
    import numpy as np

    mine = shard_indices(len(images))
    part = extractor.transform([images[i] for i in mine])
    pieces = gather_objects((list(mine), part.features, part.kept, part.failures, part.extracted, part.cached))
    rows: dict[int, np.ndarray] = {}
    failed: dict[int, tuple[str, str]] = {}
    extracted = cached = 0
    for indices, features, kept, failures, n_extracted, n_cached in pieces:
        for row, local in enumerate(kept):
            rows[indices[local]] = features[row]
        failed_local = sorted(set(range(len(indices))) - set(kept))  # failures come in input order
        for local, failure in zip(failed_local, failures):
            failed[indices[local]] = failure
        extracted, cached = extracted + n_extracted, cached + n_cached
    kept_all = sorted(rows)
    dim = pieces[0][1].shape[1]
    features = np.stack([rows[i] for i in kept_all]) if kept_all else np.zeros((0, dim), np.float32)
    return ExtractionResult(features, kept_all, [failed[i] for i in sorted(failed)], extracted, cached)


def train_sampler(dataset, seed: int):
    """Each rank's disjoint, shuffled shard of ``dataset`` (``set_epoch`` reshuffles), or
    None in one process, where the loader's own seeded shuffle is used."""
    if world_size() == 1:
        return None
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)


def wrap_for_training(backbone: torch.nn.Module, head: torch.nn.Module, device: str) -> torch.nn.Module | None:
    """The network that fine-tuning steps run through: under ``torchrun``, backbone and
    head in one ``DistributedDataParallel`` (gradients averaged over the ranks after
    each backward; its constructor copies rank 0's weights to all); None in one process."""
    if world_size() == 1:
        return None
    import torch
    from torch.nn.parallel import DistributedDataParallel

    net = torch.nn.Sequential(backbone, head)
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(net, device_ids=ids)


def sync_buffers(*modules: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm statistics) on every rank, so all end identical."""
    import torch.distributed as dist

    if world_size() == 1:
        return
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


# ---------------------------------------------------------------- failures and launching


def report_failure(message: str, interrupted: bool = False) -> bool:
    """Called by a rank that stops: an error's ``message`` is recorded where torchrun's
    failure summary reads it (``TORCHELASTIC_ERROR_FILE``); an interruption's is not,
    since a rank stopped because another failed is not the cause. Returns whether this
    rank should also print the message: only rank 0 does, and none when ``launch``
    started the job (the launcher prints the one message)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and is_distributed() and not interrupted:
        try:
            with open(path, "w") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
        except OSError:
            pass
    return not is_distributed() or (is_main_process() and not launched_by_imgclf())


def peer_stopped(error: BaseException) -> bool:
    """Whether ``error`` is a collective broken because another rank stopped (its own
    error, or a signal, is the cause to report; this is a consequence)."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, getattr(dist, "DistBackendError", ())) or any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "remote worker")
    )


def check_process_count(nproc_per_node: int, device: str = "auto") -> None:
    """Refuse more processes than this machine can give one each: a GPU per rank where the
    ranks train on GPUs, else a CPU core per rank (more ranks only share the same cores and
    hold a copy of the network each, about 0.4 GB). Raises :class:`OptionError` with the reason."""
    if isinstance(nproc_per_node, bool) or not isinstance(nproc_per_node, int) or nproc_per_node < 1:
        raise OptionError(f"--nproc-per-node must be a positive integer, got {nproc_per_node!r}")
    if device.startswith(("cuda", "auto")):
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus:
            if nproc_per_node > gpus:
                raise OptionError(f"--nproc-per-node {nproc_per_node}: this machine has {gpus} GPU(s), one per "
                                  f"process; use at most {gpus}")  # fmt: skip
            return
    cores = os.cpu_count() or 1
    if nproc_per_node > cores:
        raise OptionError(f"--nproc-per-node {nproc_per_node}: this machine has {cores} CPU core(s) and no GPU for "
                          f"the ranks; more processes than cores only share them and hold a copy of the network "
                          f"each: use at most {cores}")  # fmt: skip


def launch(argv: Sequence[str], nproc_per_node: int) -> int:
    """Run ``python -m imgclf *argv`` as ``nproc_per_node`` ranks on this machine with
    PyTorch's elastic launcher (``torchrun --standalone``) and wait for them.

    Rank 0 prints the report; a failure or Ctrl-C ends every rank and becomes one
    line here. Returns the exit code.
    """
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check(COMMANDS["train"]["nproc_per_node"], nproc_per_node, required=True)
    check_process_count(nproc_per_node)
    for name in list(logging.root.manager.loggerDict):  # each has its own level: the failure is our one line
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # One thread per rank unless asked: N ranks of all-core arithmetic on N cores thrash.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    os.environ[LAUNCHED_ENV] = "1"
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc_per_node, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
    )  # fmt: skip
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "imgclf", *argv)
    except SignalException:
        raise TrainingInterrupted(
            "training interrupted; every rank stopped, and progress up to the last finished epoch is kept in "
            "the workspace: run the same command with --resume to continue"
        ) from None
    except ChildFailedError as e:
        failures = sorted(e.failures.items(), key=lambda kv: (not kv[1].error_file_data, kv[1].timestamp, kv[0]))
        failed_rank, failure = failures[0]
        if failure.error_file_data:
            message = f"rank {failed_rank}: {failure.message}"
            raise DistributedRunError(message, rank_exit_code=failure.exitcode) from None
        raise DistributedRunError(
            f"rank {failed_rank} stopped with exit code {failure.exitcode} (its output is above); "
            "the other ranks were stopped"
        ) from None
    finally:
        os.environ.pop(LAUNCHED_ENV, None)
    return 0
