"""FSDP2: `fully_shard` on every transformer block, then on the whole model.

Only rank 0 builds (or loads) the whole model, on its host; the other ranks build its structure on
the meta device, and each rank's shards are filled from rank 0's weights by broadcast.

Each worker holds 1/N of the weights, gradients and optimizer state; a block's weights are gathered
for its forward and backward. Checkpoints are torch.distributed.checkpoint (DCP) shards, one file per
rank, which DCP can reload on a different number of workers (elastic runs). The final model is
gathered into one full state dict on rank 0.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from raylm.train.engine import Engine, plain_copy


def _trained_only():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


class FSDPEngine(Engine):
    @contextlib.contextmanager
    def generating(self):
        """The root's own parameters (embeddings, final norm, head) gathered for generation: a PEFT
        model's generate() runs the inner model's forward, not the root's, whose hooks would gather
        them; each block still gathers its own in its forward. Before the first forward the root is
        made the root first (FSDP2 picks as root the first module to run forward: it would be a block)."""
        self.model._get_fsdp_state()._lazy_init()  # a no-op once a forward has run
        self.model.unshard()
        try:
            yield
        finally:
            self.model.reshard()

    def no_sync(self):
        @contextlib.contextmanager
        def unsynced():
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)

        return unsynced()

    def save(self, folder: Path, rank: int) -> None:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=_trained_only())
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder / "sharded"))
        if rank == 0:
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")

    def load(self, folder: Path, rank: int) -> None:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=_trained_only())
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(folder / "sharded"))
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=_trained_only(),
        )
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))

    def consolidated(self, rank: int):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(  # what trained: a frozen base is rebuilt from its source
            self.model,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True),
        )
        return plain_copy(self, self.model, full) if rank == 0 else None


def setup(model, strategy, train, total_steps: int, device, make_optimizer=None, rebuild=None):
    """Shard `model` (complete on rank 0; its structure, parameters on the meta device, elsewhere):
    every rank shards the structure, allocates only its own shards, and receives their values from
    rank 0 one tensor at a time. No rank but 0 ever holds a full copy, and no device more than its
    shards plus the tensor being sent."""
    import torch

    options = options_of(strategy, train, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # fully_shard places shards on the current device
    if getattr(model, "is_loaded_in_4bit", False):
        options.pop("mp_policy", None)  # it would cast the packed codes
        return _shard_4bit(model, options, train, total_steps, device, make_optimizer, rebuild)
    shard_from_rank0(model, options, strategy, train, device)
    return _engine(model, train, total_steps, contextlib.nullcontext(), make_optimizer, rebuild)


def shard_from_rank0(model, options: dict, strategy, train, device, master: bool = True) -> None:
    """Shard `model` in place (complete on rank 0, its structure elsewhere) and fill every rank's
    shards from rank 0's weights. `master`: under bf16 the shards are the optimizer's fp32 master
    weights; a frozen model (a preference run's reference copy) keeps its own dtype."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = model.state_dict() if dist.get_rank() == 0 else {}  # rank 0's weights, kept on its host
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}  # RoPE's: computed, not loaded
    persistent = set(model.state_dict())
    model.to("meta")
    if train.precision == "bf16" and master:
        model.to(torch.float32)
    _shard_blocks_then_root(model, options)
    model.to_empty(device="cpu" if strategy.cpu_offload else device)
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, value.to(device), persistent=name in persistent)
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    del full


def options_of(strategy, train, device) -> dict:
    """fully_shard's options for `strategy` (resharding, CPU offload; with bf16, bf16 compute and
    communication while the sharded weights (the optimizer's master copy) and the gradient reduction
    stay fp32, even when model.dtype loads the weights in bf16)."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    options = {"reshard_after_forward": strategy.reshard_after_forward}
    if strategy.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")  # pinning needs a GPU
    if train.precision == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return options


def _shard_4bit(model, options, train, total_steps: int, device, make_optimizer, rebuild):
    """QLoRA (raylm/methods/qlora.py): every rank loaded the same 4-bit base on its host and built the
    same LoRA weights, so each shards its own copy where it is: the packed codes (stored in the compute
    dtype) shard like any tensor; a layer's quantisation constants stay whole on its module, where
    bitsandbytes finds them again when FSDP swaps in the gathered weight. No mixed-precision policy:
    it would cast the packed codes; the compute dtype is bitsandbytes' and autocast's."""
    from raylm.train.strategies import autocast, quant_states_to

    _shard_blocks_then_root(model, options)
    quant_states_to(model, device)
    return _engine(model, train, total_steps, autocast(train.precision, device), make_optimizer, rebuild)


def _shard_blocks_then_root(model, options: dict) -> None:
    """fully_shard each transformer block (gathered one at a time), then the rest as the root."""
    from torch.distributed.fsdp import fully_shard

    from raylm.methods.blocks import transformer_blocks

    for block in transformer_blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)


def _engine(model, train, total_steps: int, autocast, make_optimizer, rebuild) -> FSDPEngine:
    from raylm.train import optim

    optimizer = (make_optimizer or optim.adamw)(model, train)
    return FSDPEngine(
        model, optimizer, optim.scheduler(optimizer, train, total_steps), train, autocast, rebuild=rebuild
    )
