"""What noisescale needs to know about a model sharded by PyTorch's FSDP: FSDP2 (``fully_shard``) and FSDP1
(``FullyShardedDataParallel``, flat parameters or ``use_orig_params=True``).

Per-example gradient norms need no gathering under sharding: every example and its activations live on one rank
and only the parameters are sharded, so the ghost hooks see whole layers (FSDP unshards them for the forward and
the backward). What changes is where the parameters are: between calls a parameter is a sharded DTensor (FSDP2),
a slice of a flat parameter (FSDP1) or an empty (0,) shard, so nothing here or in the rules reads its values or
shape outside a module's forward; the accumulated gradient is sharded too, so its squared norm is summed over the
shards (one all-reduce).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from noisescale._checks import listed
from noisescale._gradient_norm import gradients_finite

__all__ = [
    "is_sharded",
    "sharding_group",
    "flat_parameter_owners",
    "local_part",
    "gradient_sync",
    "sharded_grad_sqnorm",
    "every_gradient_finite",
    "sharded_gradients_finite",
    "clean_name",
    "fsdp2_units",
    "is_fsdp2_unit",
    "refuse_tensor_parallel",
    "fsdp2_shards",
    "sharding_kept",
]

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def is_fsdp2_unit(module: nn.Module) -> bool:
    """Whether FSDP2 ``fully_shard`` wraps ``module``: calling it runs FSDP2's hooks (all-gather, reshard)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def fsdp2_units(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that FSDP2 ``fully_shard`` wraps: each reshards its parameters in a forward hook
    registered before any of noisescale's."""
    return [m for m in model.modules() if is_fsdp2_unit(m)]


def _param_groups(unit: nn.Module) -> list:
    """FSDP2's parameter groups of ``unit`` (torch's private state: ``_fsdp_param_groups`` in torch 2.13, a single
    ``_fsdp_param_group``, or None, in earlier releases)."""
    state = unit._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def _fsdp2_params(model: nn.Module) -> list:
    """FSDP2's record of each parameter of its units (``FSDPParam``: the shard, and the unsharded parameter it
    registers in the shard's place while the unit is unsharded)."""
    return [fsdp_param for unit in fsdp2_units(model) for group in _param_groups(unit)
            for fsdp_param in group.fsdp_params]


def fsdp2_shards(model: nn.Module) -> dict[int, Tensor]:
    """FSDP2: id of each tensor a module may hold as a parameter (the shard, or the unsharded parameter registered
    in its place from a unit's unshard to its reshard) -> the shard, the same object from step to step. Empty
    without FSDP2."""
    shards = {}
    for fsdp_param in _fsdp2_params(model):
        shards[id(fsdp_param.sharded_param)] = fsdp_param.sharded_param
        unsharded = getattr(fsdp_param, "_unsharded_param", None)
        if unsharded is not None:
            shards[id(unsharded)] = fsdp_param.sharded_param
    return shards


@contextlib.contextmanager
def sharding_kept(model: nn.Module) -> Iterator[None]:
    """FSDP2: the units sharded on entry are resharded on exit. A forward no backward follows (noisescale's checks
    after the caller's pass) leaves a unit FSDP2 does not reshard after its forward (the root, by default)
    unsharded, its unsharded parameters registered on the model without the gradients, which sit on the shards:
    a Trainer's gradient clipping over ``model.parameters()`` read no gradient there and clipped less."""
    sharded = [unit for unit in fsdp2_units(model)
               if all(group.is_sharded for group in _param_groups(unit))]
    try:
        yield
    finally:
        for unit in sharded:
            unit.reshard()


def _fsdp1_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FullyShardedDataParallel
    return [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` or any of its submodules is sharded by FSDP2 or FSDP1."""
    return bool(fsdp2_units(model) or _fsdp1_modules(model))


def sharding_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The process group over which ``model``'s parameters are sharded (None when it is not sharded).

    FSDP1: the wrapper's ``process_group``; FSDP2: the group of its one-dimensional device mesh (the parameters'
    DTensor mesh). Hybrid sharding (a 2-D mesh, or FSDP1's hybrid strategies) is refused: the examples would be
    split over more ranks than the parameters are."""
    fsdp1 = _fsdp1_modules(model)
    if fsdp1:
        from torch.distributed.fsdp import ShardingStrategy
        if fsdp1[0].sharding_strategy in (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2):
            raise ValueError("hybrid sharding (HYBRID_SHARD) is not supported: use FULL_SHARD or SHARD_GRAD_OP over "
                             "one process group")
        if fsdp1[0].sharding_strategy == ShardingStrategy.NO_SHARD:
            raise ValueError("FSDP's NO_SHARD is not supported (every rank holds the whole gradient, so the sum of "
                             "the ranks' squared norms would count it once per rank): use DistributedDataParallel, "
                             "which it equals, or FULL_SHARD / SHARD_GRAD_OP")
        return fsdp1[0].process_group
    if not fsdp2_units(model):
        return None
    from torch.distributed.tensor import DTensor
    meshes = {p.device_mesh for p in model.parameters() if isinstance(p, DTensor)}
    if len(meshes) != 1 or next(iter(meshes)).ndim != 1:
        raise ValueError(f"the model's parameters lie on {len(meshes)} device meshes of dims "
                         f"{sorted(m.ndim for m in meshes)}; noisescale supports fully_shard over one 1-D mesh "
                         "(hybrid sharding is not supported)")
    return next(iter(meshes)).get_group()


def refuse_tensor_parallel(model: nn.Module) -> None:
    """Raise a ValueError naming them when ``model`` has DTensor parameters but no FSDP module: tensor (or sequence)
    parallelism (``parallelize_module``, Lightning's ModelParallelStrategy with ``tensor_parallel_size`` > 1).
    There a layer's weight and activations stay split over the ranks in its forward and backward, and an example
    is not on one rank alone, so the ghost norms cannot be read from any rank; before, the first call failed deep
    in the hooks with DTensor's "got mixed torch.Tensor and DTensor"."""
    if is_sharded(model):
        return
    from torch.distributed.tensor import DTensor
    names = [clean_name(name) for name, p in model.named_parameters() if isinstance(p, DTensor)]
    if names:
        raise ValueError(f"the parameters {listed(names)} are DTensors of a model not sharded by FSDP (tensor "
                         "parallelism, e.g. parallelize_module or Lightning's ModelParallelStrategy with "
                         "tensor_parallel_size > 1): per-example gradient norms are not supported under tensor parallelism; use DDP or FSDP "
                         "(fully_shard over a 1-D mesh)")


def clean_name(name: str) -> str:
    """A parameter name without the prefixes of FSDP1's and the activation-checkpoint wrappers."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def flat_parameter_owners(model: nn.Module) -> list[tuple[nn.Module, str, str, bool]]:
    """(module, local name, name in the model, requires_grad) of every original parameter that FSDP1 keeps in a
    flat parameter (``use_orig_params=False``): those parameters are no longer registered on their modules, but
    the ghost hooks still measure them by their modules' calls. Shared parameters are listed for every module
    that uses them, under the name of their first owner. Empty for FSDP2 and ``use_orig_params=True``."""
    from torch.distributed.fsdp._flat_param import FlatParameter
    path_of = {module: path for path, module in model.named_modules()}
    owners = []
    for flat in model.parameters():
        if not isinstance(flat, FlatParameter) or getattr(flat, "_params", None) is not None:
            continue  # use_orig_params=True keeps the original parameters registered (flat._params)
        for info in flat._param_infos:
            name = clean_name(f"{path_of[info.module]}.{info.param_name}".lstrip("."))
            owners.append((info.module, info.param_name, name, flat.requires_grad))
        for info in flat._shared_param_infos:
            name = clean_name(f"{path_of[info.prim_module]}.{info.prim_param_name}".lstrip("."))
            owners.append((info.module, info.param_name, name, flat.requires_grad))
    return owners


def fsdp1_original_parameters(model: nn.Module) -> list[nn.Parameter]:
    """FSDP1 with ``use_orig_params=True``: the original parameters, registered on their modules as views of their
    flat parameter's shard. FSDP1's forward reads plain-tensor views of the unsharded flat parameter instead, so
    the graph of a forward takes an original parameter only where a module reads it outside its unit's calls
    (another unit's weight, after that unit resharded). Empty for FSDP2 and ``use_orig_params=False``."""
    handles = [module._handle for module in _fsdp1_modules(model) if module._handle is not None]
    return [p for handle in handles for p in handle.flat_param._params or ()]


def local_part(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, a backward reduces the gradients over the ranks only when ``enabled`` (accumulation:
    disable it for every micro-batch but the last). FSDP1: ``no_sync()``; FSDP2:
    ``set_requires_gradient_sync``, restored to True on exit."""
    if enabled:
        yield
        return
    fsdp1 = _fsdp1_modules(model)
    if fsdp1:
        with fsdp1[0].no_sync():
            yield
        return
    roots = [m for m in fsdp2_units(model)]
    for module in roots:
        module.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for module in roots:
            module.set_requires_gradient_sync(True, recurse=False)


def _local_grads(model: nn.Module) -> list[Tensor]:
    return [local_part(p.grad) for p in model.parameters() if p.grad is not None]


def sharded_grad_sqnorm(model: nn.Module, group: dist.ProcessGroup | None) -> Tensor:
    """|gbar|^2 of the sharded accumulated gradient (FSDP averages it over the ranks): the squared norms of this
    rank's shards, accumulated in float64, summed over the ranks by one all-reduce. Every rank gets the sum."""
    grads = _local_grads(model)
    device = grads[0].device if grads else next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        total += torch.linalg.vector_norm(grad, dtype=torch.float64).square()
    dist.all_reduce(total, group=group)
    return total


def every_gradient_finite(model: nn.Module, sharded: bool, group: dist.ProcessGroup | None) -> bool:
    """Whether every p.grad is finite, with one answer on every rank: under FSDP, whose shards differ by rank, by
    one all-reduce over ``group`` (:func:`sharded_gradients_finite`); otherwise from this process's p.grad (under
    DDP all-reduced already, the same on every rank: no collective)."""
    return sharded_gradients_finite(model, group) if sharded else gradients_finite(model)


def sharded_gradients_finite(model: nn.Module, group: dist.ProcessGroup | None) -> bool:
    """Whether every shard of every p.grad on every rank is finite (one float64 sum, all-reduced)."""
    grads = _local_grads(model)
    device = grads[0].device if grads else next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        total += grad.sum(dtype=torch.float64)
    dist.all_reduce(total, group=group)
    return bool(torch.isfinite(total))
