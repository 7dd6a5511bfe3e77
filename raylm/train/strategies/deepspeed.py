"""DeepSpeed ZeRO stage 1, 2 or 3, optionally offloading optimizer state (and, at stage 3, parameters)
to the CPU. raylm writes the DeepSpeed config from the spec; `strategy.config` (a mapping or a JSON
file) is merged over it for everything else DeepSpeed offers.

Runs on CPU workers too: DeepSpeed picks its CPU accelerator by itself; the optimizer is torch's AdamW
(`torch_adam`), so no DeepSpeed op has to be compiled for it.
"""

from __future__ import annotations

from pathlib import Path

from raylm.spec.reading import deep_merge
from raylm.train.engine import Engine, forward_loss, plain_copy
from raylm.train.strategies import quant_states_to

TAG = "deepspeed"  # checkpoint subfolder


def config(strategy, train, precision: str, hidden: int) -> dict:
    """The DeepSpeed config of the spec for a model of `hidden` size, with the user's `strategy.config`
    merged over it. The buckets are sized from the model (raylm.planning.memory.zero_sizes), which the
    memory estimate counts."""
    from raylm.planning.memory import zero_sizes

    override = strategy.override()
    zero: dict = {"stage": strategy.stage, **zero_sizes(hidden, override.get("zero_optimization"))}
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
    return deep_merge(generated, override)


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
        """The full model on rank 0. Under ZeRO-3 the trained parameters are gathered one module at a
        time and copied to rank 0's host, so no rank holds more than its partition plus one module; a
        frozen base is not gathered at all (the export rebuilds it from its source). A bf16 / fp16 run
        exports the optimizer's fp32 master weights (what `zero_to_fp32` consolidates from the
        checkpoint), not the 16-bit copies the module computes with."""
        import deepspeed
        import torch
        from deepspeed.utils import safe_get_full_fp32_param

        stage3 = self.model.zero_optimization_stage() == 3
        low_precision = any(
            p.dtype in (torch.bfloat16, torch.float16) for p in self.module.parameters() if p.requires_grad
        )
        state = {}
        for prefix, module in self.module.named_modules():
            trained = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if low_precision:  # collective: every rank assembles the partitions of the master weights
                masters = [(n, safe_get_full_fp32_param(p)) for n, p in trained]
                if rank == 0:
                    for name, tensor in [*masters, *module.named_buffers(recurse=False)]:
                        key = f"{prefix}.{name}" if prefix else name
                        state.setdefault(key, tensor.detach().float().cpu().clone())
                continue
            with deepspeed.zero.GatheredParameters(
                [p for _, p in trained], modifier_rank=None, enabled=stage3 and bool(trained)
            ):
                if rank == 0:
                    for name, tensor in [*trained, *module.named_buffers(recurse=False)]:
                        key = f"{prefix}.{name}" if prefix else name
                        state.setdefault(key, tensor.detach().float().cpu().clone())
        if rank != 0:
            return None
        wanted = self.module.state_dict().keys()  # the persistent entries, under their state-dict names
        return plain_copy(self, self.module, {k: v for k, v in state.items() if k in wanted})


def partition_from_rank0(model, settings: dict, device) -> None:
    """ZeRO-3 partitioning of `model` (complete on rank 0; its structure, parameters on the meta
    device, elsewhere) one module at a time: each rank allocates a module's parameters, DeepSpeed
    broadcasts rank 0's values into them and keeps only the rank's partition. No rank but 0 ever holds
    a full copy, and none more than its partitions plus one module's parameters."""
    import deepspeed
    import torch
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    materialized: dict[int, tuple] = {}  # id of a meta parameter -> (it, its real replacement): ties stay

    def allocate(module, recurse: bool) -> None:
        for owner in module.modules() if recurse else (module,):
            for name, param in list(owner._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                if id(param) not in materialized:
                    real = torch.nn.Parameter(torch.empty_like(param, device=device), param.requires_grad)
                    materialized[id(param)] = (param, real)
                owner._parameters[name] = materialized[id(param)][1]

    converter = None  # the first partitioned parameter converts the others with the same settings
    for module in model.modules():
        if converter is None and any(True for _ in module.parameters(recurse=False)):
            allocate(module, recurse=True)  # Init(module=) converts the module's children too
            deepspeed.zero.Init(module=module, config_dict_or_path=settings)
            converter = next(module.parameters(recurse=False))
            continue
        allocate(module, recurse=False)
        params = [p for p in module.parameters(recurse=False) if not is_zero_param(p)]
        if params:
            converter.convert_to_zero_parameters(params)
    for module in model.modules():  # buffers (RoPE's: computed on every rank) go as they are
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def frozen_zero3(model, strategy, train, device):
    """A frozen model partitioned like the policy under ZeRO-3 (a preference run's reference copy):
    partitioned from rank 0 as the policy is, then wrapped by a DeepSpeed engine without an optimizer,
    whose hooks gather each module's parameters for its forward. Returns the module to call."""
    import deepspeed

    settings = config(strategy, train, train.precision, model.config.get_text_config().hidden_size)
    settings.pop("optimizer", None)
    partition_from_rank0(model, settings, device)
    engine, *_ = deepspeed.initialize(model=model, config=settings, dist_init_required=False)
    return engine.module


def setup(model, strategy, train, total_steps: int, device, make_optimizer=None, rebuild=None):
    import deepspeed
    import torch

    from raylm.train import optim

    # a composite model (vision-language) keeps its decoder's size in its text config
    settings = config(strategy, train, train.precision, model.config.get_text_config().hidden_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if settings["zero_optimization"]["stage"] == 3:
        partition_from_rank0(model, settings, device)
        quant_states_to(model, device)  # QLoRA's 4-bit layers: their constants are not parameters
    elif device.type == "cuda":
        model = model.to(device)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=optim.param_groups(model, train),
        config=settings,
        lr_scheduler=lambda opt: optim.scheduler(opt, train, total_steps),
        dist_init_required=False,  # Ray Train made the process group
    )
    return DeepSpeedEngine(engine, optimizer, scheduler, train, None, rebuild=rebuild)
