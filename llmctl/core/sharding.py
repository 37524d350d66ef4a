"""FSDP2 (`strategy=fsdp` under torchrun): parameters, gradients and optimizer state sharded over the processes,
with torch's own `fully_shard` (each transformer layer one unit, then the whole model) on a mesh of the run's
device type (gloo on CPU, NCCL on GPUs).

The caller's model stays an ordinary module: `shard` shards a copy (the original is kept on the CPU meanwhile),
`gather_into` loads the full trained weights back into the original on rank 0 (what the stage judges and saves
as its HF checkpoint; a collective, every rank calls it) and `scatter_from` the reverse (restoring the best
weights, broadcast from rank 0). Evaluation under FSDP is collective too: every rank runs the forward passes
(each holds only its shards), rank 0 logs.

The resumable state is sharded: each rank writes its own slices — its local shard of every parameter and of the
optimizer's moments — as safetensors (`save_local` / `load_local`); a resume runs with the same number of
processes and strategy (the run's identity and fixed settings say so) and reads them back in place.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmctl.core.families import transformer_layers


def shard(model, rt):
    """A sharded copy of `model` on `rt.device`, every rank's shards cut from rank 0's weights (as DDP starts from
    rank 0's); the original is moved to the CPU and left untouched."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.cpu()
    sharded = copy.deepcopy(model)
    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    for layer in transformer_layers(sharded):
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)  # moves its shards to the mesh's device
    scatter_from(sharded, model, rt)
    return sharded


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _resharded(sharded):
    """`sharded` with every unit's parameters back in their shards: the root unit keeps its parameters whole
    after a forward pass (FSDP2's default), and the state-dict functions expect them sharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in sharded.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return sharded


def gather_into(sharded, plain, rt) -> None:
    """Load the full weights of `sharded` into `plain` on rank 0 (kept on `rt.device`); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    _resharded(sharded)
    full = get_model_state_dict(sharded, options=_full_options(cpu_offload=True))  # rank 0 receives, others {}
    if rt.is_main:
        plain.load_state_dict(full)
        plain.to(rt.device)


def scatter_from(sharded, plain, rt) -> None:
    """Load `plain`'s weights (read on rank 0) into every rank's shards of `sharded`; every rank calls it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = plain.state_dict() if rt.is_main else {}
    set_model_state_dict(_resharded(sharded), state, options=_full_options(broadcast_from_rank0=True))


def _local(t):
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).detach().contiguous()


def save_local(sharded, optimizer, folder: Path, rank: int) -> None:
    """This rank's slices of the weights and the optimizer state, as safetensors in `folder`."""
    _resharded(sharded)  # (after an evaluation the root unit holds its parameters whole)
    tensors = {name: _local(p) for name, p in sharded.named_parameters()}
    tensors.update({f"buffer.{name}": _local(b) for name, b in sharded.named_buffers()})
    save_file(tensors, str(folder / f"model-rank{rank}.safetensors"))
    opt = optimizer.state_dict()
    moments = {
        f"{pid}.{k}": _local(v if torch.is_tensor(v) else torch.tensor(v))
        for pid, st in opt["state"].items()
        for k, v in st.items()
    }
    save_file(
        moments,
        str(folder / f"optimizer-rank{rank}.safetensors"),
        metadata={"param_groups": json.dumps(opt["param_groups"])},
    )


def load_local(sharded, optimizer, folder: Path, rank: int) -> None:
    """Read back what `save_local` wrote for this rank, in place (parameters, buffers, optimizer state)."""
    from torch.distributed.tensor import DTensor

    saved = load_file(str(folder / f"model-rank{rank}.safetensors"))
    _resharded(sharded)
    with torch.no_grad():
        for name, p in sharded.named_parameters():
            (p.to_local() if isinstance(p, DTensor) else p).copy_(saved[name])
        for name, b in sharded.named_buffers():
            b.copy_(saved[f"buffer.{name}"])
    path = folder / f"optimizer-rank{rank}.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        groups = json.loads(fh.metadata()["param_groups"])
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the ids state_dict numbers
    state: dict[int, dict] = {}
    for key, value in load_file(str(path)).items():
        pid, name = key.split(".", 1)
        p = params[int(pid)]
        if name != "step" and isinstance(p, DTensor):  # moments are sharded like their parameter
            value = DTensor.from_local(
                value.to(p.device), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
