"""DeepSpeed ZeRO stage 1, 2 or 3, optionally offloading optimizer state (and, at stage 3, parameters)
to the CPU. raylm writes the DeepSpeed config from the spec; `strategy.config` (a mapping or a JSON
file) is merged over it for everything else DeepSpeed offers.

Runs on CPU workers too: DeepSpeed picks its CPU accelerator by itself; the optimizer is torch's AdamW
(`torch_adam`), so no DeepSpeed op has to be compiled for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from raylm.train.engine import Engine, forward_loss, plain_copy

TAG = "deepspeed"  # checkpoint subfolder


def config(strategy, train, precision: str) -> dict:
    """The DeepSpeed config of the spec, with the user's `strategy.config` merged over it."""
    zero: dict = {"stage": strategy.stage}
    if strategy.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if strategy.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    generated = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip or 0.0,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": train.lr, "betas": list(train.betas), "torch_adam": True},
        },
        # torch's AdamW also steps offloaded states (DeepSpeedCPUAdam would need a compiled op).
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    override = strategy.config
    if isinstance(override, str):
        override = json.loads(Path(override).read_text())
    return merge(generated, override or {})


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


class DeepSpeedEngine(Engine):
    """DeepSpeed's engine does loss scaling, accumulation, clipping, the step and the schedule itself."""

    @property
    def module(self):
        return self.model.module

    @property
    def lr(self) -> float:
        return self.model.get_lr()[0]

    def loss(self, batch: dict, training: bool = False, items=None):
        if training and self.objective is not None:
            return self.objective(self.model, batch, items)
        return forward_loss(self.model, batch, self.spec, items)

    def micro_step(self, batch: dict, items, boundary: bool) -> float:
        loss = self.loss(batch, training=True, items=items)
        self.model.backward(loss, scale_wrt_gas=False)  # `items` already counts every micro-batch
        self.model.step()  # steps the optimizer only at the accumulation boundary
        return loss.item() * float(items)

    def save(self, folder: Path, rank: int) -> None:
        self.model.save_checkpoint(str(folder), tag=TAG, save_latest=False, exclude_frozen_parameters=True)

    def load(self, folder: Path, rank: int) -> None:
        path, _ = self.model.load_checkpoint(str(folder), tag=TAG, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"{folder}: DeepSpeed found no checkpoint to load")

    def consolidated(self, rank: int):
        """The full model on rank 0. Under ZeRO-3 the parameters are gathered one module at a time
        and copied to rank 0's host, so no rank holds more than its partition plus one module."""
        import deepspeed

        stage3 = self.model.zero_optimization_stage() == 3
        state = {}
        for prefix, module in self.module.named_modules():
            params = list(module.parameters(recurse=False))
            with deepspeed.zero.GatheredParameters(
                params, modifier_rank=None, enabled=stage3 and bool(params)
            ):
                if rank == 0:
                    for name, tensor in [
                        *module.named_parameters(recurse=False),
                        *module.named_buffers(recurse=False),
                    ]:
                        key = f"{prefix}.{name}" if prefix else name
                        state.setdefault(key, tensor.detach().float().cpu().clone())
        if rank != 0:
            return None
        wanted = self.module.state_dict().keys()  # the persistent entries, under their state-dict names
        return plain_copy(self, self.module, {k: v for k, v in state.items() if k in wanted})


def setup(model, strategy, train, total_steps: int, device, make_optimizer=None, rebuild=None):
    import deepspeed
    import torch

    from raylm.train import optim

    if device.type == "cuda":
        torch.cuda.set_device(device)
        model = model.to(device)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=optim.param_groups(model, train),
        config=config(strategy, train, train.precision),
        lr_scheduler=lambda opt: optim.scheduler(opt, train, total_steps),
        dist_init_required=False,  # Ray Train made the process group
    )
    return DeepSpeedEngine(engine, optimizer, scheduler, train, None, rebuild=rebuild)
