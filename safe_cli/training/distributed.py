"""Data parallelism over processes (torchrun): gloo on CPU, NCCL on GPUs.

    torchrun --nproc_per_node 4 -m safe_cli train --stage a --variant soft_retention ...

Every rank builds the same model and draws the same global batch for a step from the
(seed, step) generator, then keeps its own slice of ``batch_size`` rows (``batch_size`` is
per process; the global batch is ``batch_size x world``). Losses are sums over the rank's
answer tokens divided by the *global* token count (times the world size), so averaging the
ranks' gradients gives exactly the gradient of the global batch's mean, the same objective a
single process would optimise on the same global batch.

Why not ``torch.nn.parallel.DistributedDataParallel`` around the model: the trainable parts
(projector, fusion adapters) run inside the frozen base's forward through hooks, a step runs
several forwards (audio batch, retention batch, the teacher) before one backward, and DDP
would also broadcast and register the frozen base (14 GB for LLaVA-7B) at start. Averaging
the trainable gradients with one flat ``all_reduce`` after backward is what DDP's reducer
does, for exactly the parameters that need it.

Only rank 0 writes (metrics, checkpoints, summaries); the others wait at barriers. Signals
(SLURM's USR1) are agreed on by all ranks each step, so every rank stops after the same step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, total: int) -> slice:
        """This rank's slice of a global batch of ``total`` rows (``total`` divisible by world)."""
        per_rank = total // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, value: float) -> float:
        """Sum of a Python number over ranks (float64 on the CPU: works with gloo and NCCL alike)."""
        if not self.enabled:
            return float(value)
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor)
        return float(tensor.item())

    def mean(self, value: float) -> float:
        return self.sum(value) / self.world

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0) > 0

    def any_each(self, flags: list[bool]) -> list[bool]:
        """``any`` of several flags over ranks in one all-reduce."""
        if not self.enabled:
            return [bool(f) for f in flags]
        tensor = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor)
        return [bool(v > 0) for v in tensor.tolist()]

    def from_main(self, compute):
        """``compute()`` on rank 0 only, its (picklable) result handed to every rank.

        For what every rank would compute alike at a cost, such as the base's fingerprint (a
        hash of 14 GB at LLaVA-7B, copied off the GPU to hash).
        """
        if not self.enabled:
            return compute()
        box = [compute() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """A new tensor: the elementwise sum over ranks."""
        if not self.enabled:
            return tensor.clone()
        out = tensor.detach().clone().to(self._device())
        dist.all_reduce(out)
        return out.to(tensor.device)

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of an equally shaped tensor, in rank order."""
        if not self.enabled:
            return [tensor.clone()]
        local = tensor.detach().contiguous().to(self._device())
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return [part.to(tensor.device) for part in parts]

    def gather_to_main(self, tensor: torch.Tensor) -> Optional[list[torch.Tensor]]:
        """Every rank's copy of an equally shaped tensor on rank 0, in rank order (None elsewhere):
        what only the writing rank needs is not copied to every rank."""
        if not self.enabled:
            return [tensor.clone()]
        local = tensor.detach().contiguous().to(self._device())
        parts = [torch.empty_like(local) for _ in range(self.world)] if self.is_main else None
        dist.gather(local, parts, dst=0)
        return [part.to(tensor.device) for part in parts] if self.is_main else None

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Mean of each parameter's gradient over ranks, in one flat all-reduce (missing grads count as 0)."""
        if not self.enabled:
            return
        params = list(parameters)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
        flat = flat.to(self._device())
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset: offset + n].view_as(p).to(p.dtype).to(p.device)
            offset += n

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def from_environment(device: Optional[str] = None) -> Distributed:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank, world, local_rank)


def rank_device(distributed: Distributed, device: torch.device) -> torch.device:
    """Each rank on its own GPU (LOCAL_RANK); the CPU is shared."""
    if device.type == "cuda" and distributed.enabled:
        return torch.device("cuda", distributed.local_rank)
    return device
