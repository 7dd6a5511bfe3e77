"""`strategy: auto`: the least sharding whose estimated peak memory fits each worker's device.

    raylm run spec.yaml --set strategy=auto

Candidates in order of preference (less communication first): ddp, DeepSpeed ZeRO-1, ZeRO-2, FSDP
(full sharding, as ZeRO-3 but native PyTorch). The first whose estimate (raylm.planning.memory) fits in
`headroom` x the device memory of a worker wins; the job log says which and why. Elastic runs skip
the ZeRO stages (their checkpoints do not reload on another worker count).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raylm.planning.memory import GiB, Shape, estimate
from raylm.spec.strategies import HEADROOM, memory_key

CANDIDATES = (
    ("ddp", {"name": "ddp"}),
    ("zero1", {"name": "deepspeed", "stage": 1}),
    ("zero2", {"name": "deepspeed", "stage": 2}),
    ("fsdp", {"name": "fsdp"}),
)


class NothingFits(Exception):
    pass


def size(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 1024**2:.1f} MiB"


@dataclass(frozen=True)
class Choice:
    strategy: dict
    needed: float  # estimated peak bytes per worker
    budget: float  # bytes per worker the estimate may use
    reason: str


def choose(
    shape: Shape,
    workers: int,
    memory_bytes: float,
    headroom: float = HEADROOM,
    precision: str = "fp32",
    batch: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = False,
    flash_attention: bool = False,
    trainable: int | None = None,
    elastic: bool = False,
    weight_bits: float | None = None,
    exclude: tuple[str, ...] = (),
    dtype: str = "float32",
    teacher: float = 0.0,
    gpu: bool = False,
    reference: float = 0.0,
) -> Choice:
    """`exclude`: strategies (ddp, zero1, zero2, fsdp, zero3) the job's method cannot run under."""
    budget = memory_bytes * headroom
    tried = []
    for key, strategy in CANDIDATES:
        if (elastic and strategy["name"] == "deepspeed") or key in exclude:
            continue
        needed = estimate(
            shape,
            key,
            precision,
            workers,
            batch,
            seq_len,
            gradient_checkpointing,
            trainable,
            flash_attention,
            weight_bits,
            dtype=dtype,
            teacher=teacher,
            gpu=gpu,
            reference=reference,
        ).total
        if needed <= budget:
            rejected = "; ".join(f"{k} needs {size(n)}" for k, n in tried)
            reason = (
                f"{key} needs {size(needed)} per worker, within {size(budget)} "
                f"({headroom:.0%} of {size(memory_bytes)})" + (f"; {rejected}" if rejected else "")
            )
            return Choice(strategy, needed, budget, reason)
        tried.append((key, needed))
    smallest, needed = min(tried, key=lambda t: t[1])
    offload = (
        "{name: deepspeed, stage: 3, offload_optimizer: true}"
        if "fsdp" in exclude
        else "{name: fsdp, cpu_offload: true}"
    )
    raise NothingFits(
        f"no strategy fits: the smallest, {smallest}, needs {size(needed)} per worker of "
        f"{size(budget)}: add workers, turn on train.gradient_checkpointing, lower "
        f"train.batch_size, or offload (strategy: {offload})"
    )


def worker_memory(job) -> float:
    """Bytes of device memory per worker: the spec's figure, a GPU's total memory, or a CPU share."""
    import ray

    given = getattr(job.strategy, "memory_per_worker_gb", None)  # strategy: auto's field
    if given is not None:
        return given * GiB
    if job.resources.use_gpu:
        if not ray.cluster_resources().get("GPU"):
            raise NothingFits("resources.use_gpu is set but the Ray cluster has no GPU")

        @ray.remote(num_gpus=1, num_cpus=0)
        def gpu_memory() -> int:
            import torch

            return torch.cuda.get_device_properties(0).total_memory

        return float(ray.get(gpu_memory.remote(), timeout=300))
    return ray.cluster_resources().get("memory", 0) / job.resources.max_workers


def resolve(job) -> tuple[dict, str]:
    """The concrete strategy of `job` (as a dict) and why it was chosen."""
    if job.strategy.name != "auto":
        return job.strategy.model_dump(), "set in the spec"
    choice = choose(memory_bytes=worker_memory(job), headroom=job.strategy.headroom, **_job_terms(job))
    return choice.strategy, f"auto: {choice.reason}"


def unfit_reason(job, memory_bytes: float) -> str | None:
    """Why `job` cannot train in `memory_bytes` per worker by the estimate (None when it can): under
    `auto`, no candidate fits; otherwise the spec's strategy does not (or a precomputed preference
    reference does not: precompute_reason)."""
    preference = getattr(job, "preference", None)
    if preference is not None and preference.precompute_reference:
        reason = precompute_reason(job, memory_bytes)
        if reason is not None:
            return reason
    if job.strategy.name == "auto":
        try:
            choose(memory_bytes=memory_bytes, headroom=job.strategy.headroom, **_job_terms(job))
        except NothingFits as err:
            return str(err)
        return None
    terms = _job_terms(job)
    key = memory_key(job.strategy)
    terms.pop("elastic")
    if key in terms.pop("exclude", ()):
        return f"method {job.method.name} cannot run under {key}"
    budget = memory_bytes * HEADROOM
    needed = estimate(strategy=key, **terms, **deepspeed_terms(job.strategy)).total
    if needed <= budget:
        return None
    return (
        f"{key} needs {size(needed)} per worker by the estimate, more than {size(budget)} "
        f"({HEADROOM:.0%} of {size(memory_bytes)})"
    )


def precompute_reason(job, memory_bytes: float) -> str | None:
    """Why `preference.precompute_reference` cannot run in `memory_bytes` per worker by the estimate
    (None when it can): each of its tasks holds the whole starting model on one worker, whatever the
    training strategy shards, and a forward pass over a batch of chosen and rejected answers (one
    layer's transients at a time, no gradients, and the answers' fp32 logits and log-softmax)."""
    from raylm.planning.memory import cpu_process_bytes, layer_activation_bytes, shape_of_job

    shape = shape_of_job(job)
    bits = method_terms(job).get("weight_bits") or (32 if job.model.dtype == "float32" else 16)
    rows, seq = 2 * job.train.batch_size, job.data.seq_len
    # an evaluation pass: no dropout, so SDPA's flash kernel keeps no attention scores on CPUs too
    flash = flash_attention(job, training=False)
    layer = layer_activation_bytes(shape, rows, seq, job.train.precision, flash)
    needed = shape.params * bits / 8 + layer + 2 * rows * seq * shape.vocab * 4
    if not job.resources.use_gpu:  # a CPU worker's own memory beyond the model (memory.CPU_PROCESS)
        needed += cpu_process_bytes(job.train.precision != "fp32" or job.model.dtype != "float32")
    budget = memory_bytes * HEADROOM
    if needed <= budget:
        return None
    return (
        f"computing the reference's log-probabilities holds the whole starting model on one worker: "
        f"{size(needed)} by the estimate, more than {size(budget)} ({HEADROOM:.0%} of {size(memory_bytes)})"
    )


def _job_terms(job) -> dict:
    """What the estimate reads from a job."""
    from raylm.planning.memory import shape_of_job

    workers = job.resources.num_workers
    terms = {
        "shape": shape_of_job(job),
        "workers": workers if isinstance(workers, int) else workers[0],
        "precision": job.train.precision,
        "batch": job.train.batch_size,
        "seq_len": job.data.seq_len,
        "gradient_checkpointing": job.train.gradient_checkpointing,
        "flash_attention": flash_attention(job),
        "gpu": job.resources.use_gpu,
        "elastic": job.resources.elastic,
        "dtype": job.model.dtype,
        **method_terms(job),
        **teacher_terms(job),
    }
    preference = preference_terms(job)
    excluded = list(terms.get("exclude", ())) + list(preference.pop("exclude", ()))
    terms.update(preference)
    if job.train.precision == "fp16":  # fsdp has no fp16 loss scaling here (an explicit fsdp is refused)
        excluded.append("fsdp")
    if job.model.dtype != "float32" and job.trains_base_weights:  # ddp keeps no float32 master copy
        excluded.append("ddp")
    if excluded:
        terms["exclude"] = tuple(dict.fromkeys(excluded))
    return terms


def flash_attention(job, training: bool = True) -> bool:
    """Whether the job's attention keeps no seq^2 scores: SDPA, transformers' default, runs a flash kernel
    on a GPU, and on a CPU too (torch's CPU flash kernel, fp32 and bf16, with a padding mask or without:
    torch 2.13) unless attention dropout is on while `training`: torch's CPU SDPA then takes its math
    path, which keeps them. `model.attention: eager` keeps them everywhere."""
    if getattr(job.model, "attention", None) == "eager":
        return False
    return job.resources.use_gpu or not training or attention_dropout(job) == 0


def attention_dropout(job) -> float:
    """The dropout on attention weights of the job's model: its architecture block's `dropout`, or its
    config.json's (attention_dropout in Llama-style configs, attn_pdrop in GPT-2's)."""
    from raylm.planning.models import model_config

    config = model_config(job)
    return float(getattr(config, "attention_dropout", None) or getattr(config, "attn_pdrop", None) or 0.0)


def deepspeed_terms(strategy) -> dict:
    """An explicit DeepSpeed strategy's settings the estimate follows: its zero_optimization
    overrides (inline or in its JSON file) and optimizer offload."""
    if strategy.name != "deepspeed":
        return {}
    from raylm.planning.memory import ZERO3_NAMES

    try:
        override = strategy.override()
    except (OSError, ValueError):  # an unreadable file: preflight's message (`raylm run`, `validate`)
        override = {}
    zero = override.get("zero_optimization") if isinstance(override, dict) else None
    zero = zero if isinstance(zero, dict) else {}
    # DeepSpeed takes ZeRO-3's settings by either name; the estimate reads the stage3_ one
    for plain in ZERO3_NAMES:
        if plain in zero and f"stage3_{plain}" not in zero:
            zero = {**zero, f"stage3_{plain}": zero[plain]}
    return {
        "zero": zero or None,
        "offload_optimizer": strategy.offload_optimizer or "offload_optimizer" in zero,
    }


def teacher_terms(job) -> dict:
    """A distillation teacher's share of each worker's memory."""
    if job.kind != "distill":
        return {}
    from transformers import AutoConfig

    from raylm.planning.memory import shape_from_config, teacher_bytes
    from raylm.spec.reading import SpecError

    folder = Path(job.teacher.path).expanduser()
    if not (folder / "config.json").is_file():  # distillation reads a local teacher folder
        raise SpecError([("teacher.path", f"{job.teacher.path} is not a model folder here (no config.json)")])
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=job.teacher.trust_remote_code)
    except Exception as err:  # a config.json transformers cannot read (OSError, ValueError, ...)
        raise SpecError(
            [("teacher.path", f"cannot read {folder}/config.json ({type(err).__name__})")]
        ) from None
    return {
        "teacher": teacher_bytes(
            shape_from_config(config), job.model.dtype, job.train.batch_size, job.data.seq_len
        )
    }


def preference_terms(job) -> dict:
    """What a preference objective changes in the estimate: two sequences per example (the chosen and
    the rejected answer: twice the activations of a batch), and for full / freeze fine-tuning with a
    live reference its frozen copy of the starting model (sharded under fsdp and ZeRO-3)."""
    if job.kind != "finetune" or job.preference is None:
        return {}
    terms: dict = {"batch": 2 * job.train.batch_size}
    spec = job.preference
    if spec.uses_reference and not spec.precompute_reference and job.trains_base_weights:
        from raylm.planning.memory import shape_of_job

        terms["reference"] = shape_of_job(job).params * (4 if job.model.dtype == "float32" else 2)
    return terms


def method_terms(job) -> dict:
    """What a fine-tuning method changes in the estimate: trained parameters, a quantised base, and
    the strategies it cannot run under."""
    if job.kind != "finetune":
        return {}
    from raylm import methods

    module = methods.module(job.method.name)
    terms: dict = {"trainable": trainable_parameters(job)}
    if hasattr(module, "base_bits"):
        terms["weight_bits"] = module.base_bits(job.method)
    from pydantic import TypeAdapter

    from raylm.spec.strategies import StrategySpec

    as_spec = TypeAdapter(StrategySpec).validate_python
    every = (*CANDIDATES, ("zero3", {"name": "deepspeed", "stage": 3}))  # auto's, and the estimate's last row
    refused = tuple(
        key for key, strategy in every if methods.refusal(job.method, as_spec(strategy), job.train)
    )
    if refused:
        terms["exclude"] = refused
    return terms


def trainable_parameters(job) -> int | None:
    """Parameters the method trains, counted on a meta-device model (no memory); None if unknown."""
    from raylm import methods
    from raylm.planning.models import meta_model, model_config

    method = job.method
    counted_as = getattr(methods.module(method.name), "counted_as", None)
    try:
        model = meta_model(model_config(job), counted_as(method) if counted_as else method)
    except Exception:  # a method that cannot be built on the meta device: estimate as full
        return None
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
