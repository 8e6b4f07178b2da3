"""One failure, the same exception on every rank: the collectives that keep a loader's ranks together when some
of them fail.

A loader that raises on one rank while the others wait in a broadcast leaves them to die with gloo's
"Connection closed by peer" (or NCCL's watchdog timeout, 10 minutes later), or to hang: every rank must learn
of the failure at the next point where all of them meet, and raise there. Each rank runs a phase inside
`try`, keeps what it caught, and calls `agree` (all ranks) or `from_rank0` (when only rank 0 can fail: its
reading of the checkpoint); both raise the same exception on every rank, or return on every rank.

The exception travels as its type name and message (UTF-8 bytes and an int64 length: nothing is pickled). It
is rebuilt with its own type when that type is a builtin one a caller may catch (ValueError and TypeError for
bad arguments, FileNotFoundError, OSError, ...) or qpeft's own, else as ShardedLoadError("<type>: <message>").
The failing rank raises it `from` the original exception, so its traceback is kept there.
"""
from __future__ import annotations

import torch

from .. import _cuda
from .fsdp2 import FSDP2UnsupportedError

__all__ = ["ShardedLoadError", "agree", "from_rank0", "collective_device"]


class ShardedLoadError(RuntimeError):
    """Loading into a sharded model failed (rank 0's checks of the checkpoint, or any rank's failure); raised on
    every rank."""


_KEPT = {c.__name__: c for c in (
    TypeError, ValueError, RuntimeError, NotImplementedError, MemoryError, OSError, FileNotFoundError,
    NotADirectoryError, IsADirectoryError, PermissionError, ShardedLoadError, FSDP2UnsupportedError)}


def collective_device(group=None) -> torch.device:
    """Where the small tensors of these collectives live: the CPU for gloo, else the current CUDA device."""
    import torch.distributed as dist

    if "gloo" in str(dist.get_backend(group)) or not _cuda.rt.available():
        return torch.device("cpu")
    return torch.device("cuda", _cuda.rt.current_device())


def _encode(error: BaseException) -> bytes:
    return f"{type(error).__name__}\0{error}".encode()


def _rebuild(payload: bytes, failing: list[int], world_size: int) -> Exception:
    name, _, message = payload.decode(errors="replace").partition("\0")
    cls = _KEPT.get(name)
    if cls is None:
        cls, message = ShardedLoadError, f"{name}: {message}"
    if cls is not ShardedLoadError and len(failing) < world_size:
        # not every rank failed by itself: say where it happened (a rank's own file system, memory, ...)
        which = ", ".join(map(str, failing))
        message = f"{message} [failed on rank{'s' if len(failing) > 1 else ''} {which} of {world_size}; " \
                  f"every rank raises this error]"
    return cls(message)


class _Comm:
    def __init__(self, group, device):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.device = device if device is not None else collective_device(group)
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)

    def global_rank(self, r: int) -> int:
        return self.dist.get_global_rank(self.group, r) if self.group is not None else r

    def send_bytes(self, payload: bytes, src: int) -> bytes:
        """`payload` of group rank `src` on every rank (its length first, then the bytes)."""
        n = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        self.dist.broadcast(n, src=self.global_rank(src), group=self.group)
        buf = torch.zeros(int(n), dtype=torch.uint8, device=self.device)
        if self.rank == src and len(payload):
            buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        if len(buf):
            self.dist.broadcast(buf, src=self.global_rank(src), group=self.group)
        return bytes(buf.cpu().tolist())


def agree(error: BaseException | None, group=None, device=None) -> None:
    """A collective (every rank of `group` calls it, with what it caught or None): return on every rank if no
    rank failed, else raise on every rank the lowest failing rank's exception (its type and message)."""
    comm = _Comm(group, device)
    flag = torch.tensor([error is not None], dtype=torch.int64, device=comm.device)
    flags = [torch.zeros_like(flag) for _ in range(comm.world_size)]
    comm.dist.all_gather(flags, flag, group=comm.group)
    failing = [r for r, f in enumerate(flags) if int(f)]
    if not failing:
        return
    payload = comm.send_bytes(_encode(error) if comm.rank == failing[0] else b"", failing[0])
    raise _rebuild(payload, failing, comm.world_size) from error


def from_rank0(error: BaseException | None, group=None, device=None) -> None:
    """A collective for what only rank 0 can get wrong (its reading of the checkpoint): the other ranks pass
    None; one broadcast of an int64 when rank 0 passes None, and every rank returns."""
    comm = _Comm(group, device)
    payload = comm.send_bytes(_encode(error) if comm.rank == 0 and error is not None else b"", 0)
    if payload:
        raise _rebuild(payload, [0], comm.world_size) from error
