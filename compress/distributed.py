"""Several processes on one calibration: ``torchrun --nproc_per_node N -m compress.cli run recipe.yaml``.

Built on ``torch.distributed`` (NCCL when the run's device is CUDA, gloo otherwise); no RPC of our own.

- Calibration windows are dealt out round-robin: process ``r`` of ``N`` runs windows ``r, r+N, ...`` through
  the current block (5 windows on 2 processes: 3 and 2; a process may hold none).
- Before a group of layers is compressed, the observers of all processes are combined in rank order, so the
  result does not depend on arrival order. GPTQ/SparseGPT Hessians (the token-weighted mean form
  ``H = 2/n Σ x xᵀ`` with its token count ``n``) are gathered to the layer's owner, which solves and
  broadcasts the compressed layer (codes, scales, masks: its state dict) to every process. The owner of each
  layer is chosen from the layer names and solve cost alone (largest first onto the least-loaded process), so
  the work of a group is spread over the processes. Wanda's per-channel input norms are all-gathered and
  every process computes the same mask (cheaper than a broadcast).
- The sequence of collectives of a group depends only on the config and the module names: one gather of the
  token counts, one gather per layer, one broadcast per owner-solved layer, in sorted name order. Every
  observer exists before the forward, so a layer that saw no tokens on some process (an MoE expert) takes
  part with ``n = 0``.
- One process runs the same code: its collectives are identities.
- A failing process prints its error and exits; the others fail at their next collective, which raises
  ``PeerFailed`` (silent in the CLI), so the error is shown once. torchrun and ``torch.multiprocessing`` also
  stop the remaining processes when one exits with an error.
"""
from __future__ import annotations

import copy
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from compress.adapters import get_submodule, set_submodule
from compress.errors import CompressError

log = logging.getLogger(__name__)

#: a hung collective (a process stopped without closing its connections) fails after this long
TIMEOUT = datetime.timedelta(minutes=30)


class PeerFailed(CompressError):
    """Another process of the run failed (it shows the error); this one stops without repeating it."""

    quiet = True


@dataclass
class Comm:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    #: this process called init_process_group and destroys the group at the end
    owns_group: bool = False

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "Comm":
        return cls(0, 1, torch.device(device))

    @classmethod
    def from_env(cls, device: torch.device) -> "Comm":
        """One process (WORLD_SIZE unset or 1), or a member of the group torchrun started."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single(device)
        import torch.distributed as dist

        rank = int(os.environ["RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
        owns = False
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
            owns = True
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise CompressError("WORLD_SIZE/RANK do not match the initialized process group")
        return cls(rank, world, device, owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False

    # --- data ------------------------------------------------------------------------------------
    def my_windows(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids[self.rank::self.world_size]

    def owners(self, names: list[str], mods: dict[str, nn.Module]) -> dict[str, int]:
        """Each layer's solving process: largest solve first onto the least-loaded process (ties: lower rank)."""
        def cost(n: str) -> int:
            w = getattr(mods[n], "weight", None)
            out_f, in_f = (w.shape[0], w.shape[1]) if w is not None and w.dim() == 2 else (1, 1)
            return in_f * in_f * (in_f + out_f)

        load = [0] * self.world_size
        owner: dict[str, int] = {}
        for n in sorted(names, key=lambda n: (-cost(n), n)):
            r = min(range(self.world_size), key=lambda r: (load[r], r))
            owner[n] = r
            load[r] += cost(n)
        return owner

    # --- collectives (identities for one process) ---------------------------------------------------
    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:  # DistBackendError and gloo's "connection closed by peer"
            raise PeerFailed(f"process {self.rank}: another process of the run stopped ({str(e).splitlines()[0]})") from e

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.world_size == 1:
            return [t]
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self._call(dist.all_gather, out, t.contiguous())
        return out

    def gather(self, t: torch.Tensor, dst: int) -> list[torch.Tensor] | None:
        if self.world_size == 1:
            return [t]
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world_size)] if self.rank == dst else None
        self._call(dist.gather, t.contiguous(), out, dst=dst)
        return out

    def broadcast_module(self, module: nn.Module | None, stats: dict[str, Any] | None, src: int,
                         device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
        """``src``'s module (structure as a meta copy, tensors through broadcast) and stats, on every process."""
        if self.world_size == 1:
            return module, stats
        import torch.distributed as dist

        box: list[Any] = [None, None]
        if self.rank == src:
            box = [stats, copy.deepcopy(module).to("meta")]
        self._call(dist.broadcast_object_list, box, src=src, device=device if device.type == "cuda" else None)
        stats, skeleton = box
        if self.rank == src:
            tensors = module.state_dict()
        else:
            module = skeleton.to_empty(device=device)
            tensors = module.state_dict()  # views of module's storage: received in place
        for k in skeleton.state_dict():
            self._call(dist.broadcast, tensors[k], src=src)
        return module, stats

    # --- one group of layers ----------------------------------------------------------------------
    def compress_group(self, prefix: str, block: nn.Module, active: dict[str, Any], handler: Any,
                       device: torch.device) -> dict[str, dict[str, Any]]:
        """Combine the observers of ``active`` layers over all processes, compress each on its owner (or on
        every process for observers marked ``solve_everywhere``), and leave the same layers everywhere."""
        names = sorted(active)
        mods = {n: get_submodule(block, n) for n in names}
        owner = self.owners(names, mods)
        if self.world_size > 1:
            self._combine(prefix, names, active, owner, device)
        stats: dict[str, dict[str, Any]] = {}
        for n in active:  # the group's own order, as one process compresses
            full = f"{prefix}.{n}"
            if self._everywhere(active[n]) or self.rank == owner[n]:
                stats[full] = handler.compress(full, mods[n], active[n], lambda new, n=n: set_submodule(block, n, new))
        for n in names:
            if self._everywhere(active[n]):
                continue
            full = f"{prefix}.{n}"
            mine = self.rank == owner[n]
            new, st = self.broadcast_module(get_submodule(block, n) if mine else None, stats.get(full),
                                            owner[n], device)
            if not mine:
                set_submodule(block, n, new)
                stats[full] = st
        return {f"{prefix}.{n}": stats[f"{prefix}.{n}"] for n in active}

    def _everywhere(self, obs: Any) -> bool:
        return self.world_size == 1 or bool(getattr(obs, "solve_everywhere", False))

    def _combine(self, prefix: str, names: list[str], active: dict[str, Any], owner: dict[str, int],
                 device: torch.device) -> None:
        """Token counts all-gathered, then each observer's state gathered to its owner (or to everyone)."""
        for n in names:
            if not hasattr(active[n], "state"):
                raise CompressError(f"{prefix}.{n}: this pass's observer ({type(active[n]).__name__}) cannot be "
                                    "combined over several processes; run it with one process")
        counts = torch.tensor([int(active[n].n) for n in names], dtype=torch.int64, device=device)
        all_counts = self.all_gather(counts)
        for j, n in enumerate(names):
            obs = active[n]
            everywhere = self._everywhere(obs)
            parts = [self.all_gather(t) if everywhere else self.gather(t, owner[n]) for t in obs.state()]
            if everywhere or self.rank == owner[n]:
                per_rank = [[p[r] for p in parts] for r in range(self.world_size)]
                obs.merge(per_rank, [int(c[j]) for c in all_counts])


def merge_mean(parts: list[list[torch.Tensor]], counts: list[int]) -> tuple[list[torch.Tensor], int]:
    """Token-weighted mean of per-process means, in rank order; one contributor is taken as it is."""
    live = [(p, c) for p, c in zip(parts, counts) if c > 0]
    n = sum(c for _, c in live)
    if not live:
        return parts[0], 0
    if len(live) == 1:
        return live[0][0], n
    out = [sum(p[k] * (c / n) for p, c in live) for k in range(len(live[0][0]))]
    return out, n


def merge_sum(parts: list[list[torch.Tensor]], counts: list[int]) -> tuple[list[torch.Tensor], int]:
    """Sum of per-process sums, in rank order."""
    out = [parts[0][k].clone() for k in range(len(parts[0]))]
    for p in parts[1:]:
        for k in range(len(out)):
            out[k] += p[k]
    return out, sum(counts)
