"""Processes that train together: torchrun's environment, the process group, the model wrapped
in DDP or FSDP2, and the few collectives the loop needs (sums and agreements).

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE; `start()` reads them and joins the group
(gloo on the CPU, nccl on CUDA). With one process and `training.parallel` none (or auto) no
group is made, and every helper here is a no-op, so the single-process path stays as it was.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import io
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from truthgpt.config import Config, TrainingConfig
from truthgpt.errors import ConfigError

if TYPE_CHECKING:
    pass

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among `size` processes and how the model is split."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    parallel: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run folder, logs and checkpoints (its shard aside)."""
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return self.parallel != "none"


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_parallel(config: Config, world_size: int) -> str:
    """`training.parallel` with auto resolved: ddp under torchrun with more than one process,
    else none. ConfigError for combinations that cannot train correctly."""
    training = config.training
    parallel = training.parallel
    if parallel == "auto":
        parallel = "ddp" if world_size > 1 else "none"
    if parallel == "none" and world_size > 1:
        raise ConfigError(
            f"training.parallel: none, but {world_size} processes were started (torchrun / "
            "--nproc): each would train its own copy. Allowed: auto, ddp, fsdp."
        )
    return parallel


def start(config: Config, device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (or a group of one for `parallel` ddp/fsdp
    in a plain process); returns the World and this rank's device (cuda:LOCAL_RANK)."""
    size = env_world_size()
    parallel = resolve_parallel(config, size)
    if parallel == "none":
        return World(), device
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        check_gpu_count(int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(
            f"training.parallel: {parallel} runs on cuda or cpu, not {device.type} "
            "(hardware.device); use training.parallel: none there"
        )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        else:  # a plain process (no torchrun): a group of one, no network needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return World(rank, local_rank, dist.get_world_size(), parallel), device


def peer_lost(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another process of the group is gone
    (NCCL and the store raise torch's DistError; gloo a RuntimeError that says so)."""
    if env_world_size() <= 1:
        return False
    if isinstance(exc, dist.DistError):
        return True
    message = str(exc)
    return isinstance(exc, RuntimeError) and any(
        phrase in message for phrase in ("Connection closed by peer", "Connection reset by peer")
    )


def exit_without_teardown(code: int) -> None:
    """End a worker whose process group is gone without the interpreter's teardown: gloo's
    threads can still hold tensors then, and freeing them as Python finalizes aborted a
    finished rank ("terminate called without an active exception", a CI run)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def stop(world: World) -> None:
    """Leave the process group this process joined in `start`."""
    if world.grouped and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Collectives: no-ops without a process group.


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over every rank, in place; returns it."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_over_ranks(value: int, device: torch.device) -> int:
    """A host integer summed over every rank (itself when alone: no tensor, no sync)."""
    if not _active():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return int(tensor.item())


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag, true when it is true on any rank: one small all-reduce, so every rank takes
    the same branch (skip a step, stop) and none waits for a collective the others skipped."""
    if not _active():
        return flags
    tensor = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value` (the micro-batch that fits on every GPU)."""
    if not _active():
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


class StopVote:
    """Whether any rank was asked to stop (Ctrl-C, SIGTERM), agreed at every step without making
    a step wait: each step every rank starts a max-reduce of its flag on a gloo group of its
    own (host memory: no device sync, no place among the training's collectives) and reads the
    one it started the step before, which the others have joined by then. So all ranks stop
    at the same step, one after the request; torchrun, which passes a Ctrl-C on to the ranks
    and kills them 30 s later, never finds them still waiting for a distant log step."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo") if _active() else None
        self.pending: tuple[Any, torch.Tensor] | None = None

    def cast(self, requested: bool) -> bool:
        """This rank's vote for this step; returns whether the ranks agreed to stop (alone:
        `requested` itself; together: the vote of the step before)."""
        if self.group is None:
            return requested
        if self.finish():
            return True
        flag = torch.tensor([int(requested)])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self.pending = (work, flag)
        return False

    def finish(self) -> bool:
        """The vote in flight, waited for (the loop calls it as it ends: no collective is
        left behind); False when none is."""
        if self.pending is None:
            return False
        work, flag = self.pending
        self.pending = None
        work.wait()
        return bool(flag.item())


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object)."""
    if not _active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (tensors and plain data, as a checkpoint holds), in rank order, on
    every rank."""
    if not _active():
        return [value]
    # As bytes of torch.save, read back weights_only: object collectives' own pickling of
    # tensors fails on some versions, and plain bytes unpickle nothing but data.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    payloads: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(payloads, buffer.getvalue())
    return [torch.load(io.BytesIO(payload), weights_only=True) for payload in payloads]


# ---------------------------------------------------------------------------------------------
# The model across ranks


def wrap_model(
    model: nn.Module, world: World, device: torch.device, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """The module the loop runs forward through: DDP around `model`, or `model` itself after
    FSDP2 sharded it in place (`shard_model`), or `model` unchanged."""
    if world.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        # No model here changes a buffer as it trains (no BatchNorm), and every rank computes
        # the same ones; a diffusion run's caption embeddings, one row per distinct caption,
        # can be hundreds of MiB, which DDP would otherwise broadcast on every forward.
        # (torch 2.13 renamed the switch; the old name warns there.)
        known = inspect.signature(DistributedDataParallel).parameters
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers"
        return DistributedDataParallel(model, device_ids=device_ids, **{no_sync: False})
    if world.parallel == "fsdp":
        shard_model(model, world, device, param_dtype)
    return model


def unwrapped(model: nn.Module) -> nn.Module:
    """The module itself inside what `wrap_model` (DDP) and torch.compile put around it: where
    a task reads attributes the wrappers do not forward (a diffusion model's parts)."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's
            model = model._orig_mod
        else:
            return model


def build_on_ranks(build: Callable[[], nn.Module], world: World, meta: bool = True) -> nn.Module:
    """The model to train, on the CPU. Under FSDP with several processes only rank 0 builds
    it in full; the others build it on the meta device (no memory, no init) and `shard_model`
    fills their shards from rank 0's weights, so host memory holds one full copy, not one per
    process. A model with buffers outside its state dict (tables computed at init, such as
    transformers' rotary frequencies) is built in full everywhere: no broadcast carries them.
    `meta` False: every rank builds in full at once (a build that computes with the weights,
    as a diffusion task's encoding of its captions, cannot run on the meta device)."""
    if not meta or world.parallel != "fsdp" or world.size == 1 or world.is_main:
        return build()
    with torch.device("meta"):
        model = build()
    if unsaved_buffers(model):
        return build()
    return model


def unsaved_buffers(model: nn.Module) -> set[str]:
    """Names of the buffers `model.state_dict()` leaves out (non-persistent ones)."""
    return {name for name, _ in model.named_buffers()} - set(model.state_dict())


def fsdp_param_dtype(training: TrainingConfig, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype FSDP gathers the weights in for a run of compute `dtype`
    (`training.fsdp_param_dtype`); None: as they are stored (fp32). Only bf16 is gathered in
    its own dtype: fp16 weights would put the residual stream in fp16, whose range overflows
    where autocast's fp32 residual does not (the grad scaler guards gradients, not that)."""
    if training.fsdp_param_dtype == "fp32" or dtype != torch.bfloat16:
        return None
    return dtype


def shard_model(
    model: nn.Module, world: World, device: torch.device, param_dtype: torch.dtype | None = None
) -> bool:
    """FSDP2: shard `model` in place onto `device`, each repeated block and then the root, so
    only one block's full weights are gathered at a time (ZeRO-3); a model with an
    `fsdp_plan()` names its units, and modules every rank keeps whole. fully_shard moves each
    group's parameters to the device as it shards them: no GPU ever holds the whole model.
    With `param_dtype` the gathered weights take that dtype (the shards stay fp32) and
    gradients are reduced in fp32 (`fsdp_param_dtype`).
    Ranks that built the model on the meta device (`build_on_ranks`) get their shards from
    rank 0's weights. Returns whether they did; a model sharded already is left as it is."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if is_sharded(model):
        return False
    # A model may say what to shard (a diffusion model: its UNet, not its frozen VAE).
    plan = getattr(model, "fsdp_plan", None)
    units, whole = plan() if plan is not None else (repeated_blocks(model), [])
    kept = {param for module in whole for param in module.parameters()}
    if kept and "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise ConfigError(
            f"training.parallel: fsdp keeps a {type(model).__name__}'s frozen parts whole, "
            f"which needs torch >= 2.7 (this is {torch.__version__}); upgrade torch or use "
            "training.parallel: ddp"
        )
    for module in whole:
        module.to(device)  # fully_shard moves what it shards only
    tensors = [*model.parameters(), *model.buffers()]
    on_meta = any(t.is_meta for t in tensors)
    from_main = any_rank([on_meta], device)[0]
    # Rank 0's weights as they are now: the values every rank's shards start from.
    full = model.state_dict() if from_main and world.is_main else {}
    # fp32 reduction: a bf16 sum over ranks and accumulated micro-batches would lose the
    # small gradients (FSDP2 then also accumulates unsynced micro-batches in fp32).
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    ignored = {"ignored_params": kept} if kept else {}
    for block in units:
        fully_shard(block, mp_policy=policy, **ignored)
    fully_shard(model, mp_policy=policy, **ignored)
    if on_meta:
        model.to_empty(device=device)
    if from_main:
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full, options=options)
    return from_main


def shard_for_training(
    model: nn.Module,
    world: World,
    device: torch.device,
    training: TrainingConfig,
    dtype: torch.dtype,
    log: Callable[[str], None],
) -> None:
    """`shard_model` for a run of compute `dtype`, saying in the log what it did."""
    param_dtype = fsdp_param_dtype(training, dtype)
    if shard_model(model, world, device, param_dtype):
        log(f"fsdp: one full copy of the weights (rank 0's) sharded to {world.size} ranks")
    if param_dtype is not None:
        name = str(param_dtype).removeprefix("torch.")
        log(
            f"fsdp: weights gathered in {name} for forward and backward, gradients reduced "
            "in fp32, shards and optimizer state in fp32 (training.fsdp_param_dtype)"
        )


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 has sharded `model` already (`shard_model`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_numel(param: torch.Tensor) -> int:
    """Elements this rank holds of `param`: its shard under FSDP, else all of them."""
    from torch.distributed.tensor import DTensor

    return param.to_local().numel() if isinstance(param, DTensor) else param.numel()


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the children of the ModuleList holding the most parameters
    (our Decoder's `layers`, transformers' `model.layers` or `transformer.h`); [] if none."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return []
    biggest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(biggest)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, world: World, enabled: bool) -> Iterator[None]:
    """Around forward and backward of a micro-batch: with `enabled` False the gradients stay
    local (accumulated), and only the step's last micro-batch pays for the reduction."""
    if enabled or world.parallel == "none":
        yield
    elif world.parallel == "ddp":
        with model.no_sync():
            yield
    else:  # fsdp
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the gradients of `params` (all ranks' shards under FSDP)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def check_gpu_count(nproc: int, gpus: int | None = None) -> None:
    """ConfigError unless this machine has a GPU for each of `nproc` processes (each trains on
    cuda:LOCAL_RANK). `gpus`: how many there are (default: torch's count)."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if nproc > gpus:
        raise ConfigError(
            f"{nproc} processes on this machine, but it has {gpus} GPU(s); each process trains "
            f"on a GPU of its own: start {gpus} or fewer (--nproc, torchrun --nproc-per-node), "
            "or set hardware.device: cpu"
        )


def from_main(fn: Callable[[], T], share: Callable[[T], Any] = lambda result: result) -> Any:
    """Rank 0 runs `fn` (it prepares the run folder, say) and gets its result; the other ranks
    get `share(result)`. An error on rank 0 is raised on every rank, so none waits forever."""
    if not _active():
        return fn()
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:
            broadcast(("error", _portable(exc)))
            raise
        broadcast(("ok", share(result)))
        return result
    status, value = broadcast(None)
    if status == "error":
        raise value
    return value


def main_first(fn: Callable[[], T]) -> T:
    """Rank 0 runs `fn` first (it writes what the others then read, a tokenizer say), then the
    other ranks run it; an error on rank 0 is raised on every rank."""
    if not _active():
        return fn()
    if dist.get_rank() == 0:
        return from_main(fn, share=lambda result: None)
    from_main(fn)
    return fn()


def _portable(exc: Exception) -> Exception:
    """`exc` if it survives pickling to the other ranks, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"rank 0 failed: {type(exc).__name__}: {exc}")
    return exc
