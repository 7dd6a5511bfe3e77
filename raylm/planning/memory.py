"""Memory estimator: per-worker bytes of weights, gradients, optimizer state and activations.

    raylm estimate jobs/quickstart.yaml
    raylm estimate --params 1e9 --workers 8 --gpu-memory 80

The rules of thumb it reproduces: fp32 AdamW keeps 16 bytes per trained parameter (4 weights + 4
gradients + 8 Adam moments), so a 1B model takes 4 GB to store and about 16 GB plus activations to
train; bf16 autocast over fp32 weights keeps the same 16 (it stores nothing in 16 bits); fsdp shards
all of it (16/N). bytes_per_parameter says what ddp and fsdp allocate in each mode; zero_estimate what
DeepSpeed's ZeRO stages allocate (measured: its fp32 master clone, gradient partitions, step buffers,
buckets and ZeRO-3's gathered parameters, beside the 12/N bytes of master weights and moments).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

GiB = 1024**3
MiB = 1024**2
STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")

# What a CPU worker process adds, after its imports, beyond the model's tensors; its peak includes it (measured
# in raylm's Ray Train workers, 2 ranks, torch 2.13 CPU wheel, pyarrow 26; BENCHMARKS.md "Memory", issue
# 27). None of it grows with the model: the same at hidden 512 and 768, 2 and 12 layers, batch 4 and 8.
# On a GPU worker it is host memory, not the device's: the estimate leaves it out there.
CPU_PROCESS = {
    # libtorch_cpu's code that the first forward, backward and optimizer step run: file-backed pages, which
    # count in the resident size (more kernels in 16 bits: the bf16 ones beside the fp32 master's)
    "kernel_code": {"fp32": 14 * MiB, "16-bit": 18 * MiB},
    # what the CPU math libraries keep after their first matrix products: MKL's fast memory manager
    # (fp32 sgemm: 17 MiB allocated, ~6 of it touched) and oneDNN's bf16 primitive cache (~4 MiB of the
    # 16-bit case's 11.7: ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 frees it)
    "math_libraries": {"fp32": 6 * MiB, "16-bit": 12 * MiB},
    # the tokenized cache's reader (raylm.train.reader): pyarrow's Parquet code (~5 MiB of pages) and
    # the pages its mimalloc pool and I/O threads keep after the first read (~18 MiB)
    "reader": 23 * MiB,
    # Python objects training makes: the engine's per-parameter bookkeeping, metrics logging
    # (tensorboard on rank 0), the loop's objects (CPython's allocator and glibc's small blocks)
    "python": 10 * MiB,
}


def cpu_process_bytes(mixed: bool) -> float:
    """CPU_PROCESS for a run computing in 16 bits (`mixed`: bf16 / fp16 autocast or weights) or fp32."""
    compute = "16-bit" if mixed else "fp32"
    return float(sum(value[compute] if isinstance(value, dict) else value for value in CPU_PROCESS.values()))


@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know about a decoder-only model."""

    params: int
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Breakdown:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    temporary: float

    buckets: float = 0.0
    teacher: float = 0.0
    reference: float = 0.0  # a preference run's frozen reference copy (full / freeze fine-tuning)
    host: float = 0.0  # offloaded optimizer state in host memory: not in the device's peak
    process: float = 0.0  # a CPU worker process's own memory beyond the model (CPU_PROCESS)
    gradients_persist: bool = False  # DeepSpeed's gradient partitions live through backward too

    @property
    def total(self) -> float:
        """Peak bytes on the device. Activations are freed as backward creates gradients, and
        gradients are freed (zero_grad(set_to_none=True)) before the next forward, so the two peaks do
        not add; the optimizer step's temporaries come with the gradients. DeepSpeed's gradient
        partitions instead persist (`gradients_persist`): they add to the larger of the activations and
        the step's temporaries. DDP's buckets hold one more copy (DeepSpeed's: its reduce bucket); a
        distillation teacher's weights and output distributions, or a preference run's frozen reference
        copy, come on top, and on a CPU worker the process's own memory (`process`)."""
        if self.gradients_persist:
            live = self.gradients + max(self.activations, self.temporary)
        else:
            live = max(self.activations, self.gradients + self.temporary)
        return (
            self.weights + self.optimizer + live + self.buckets + self.teacher + self.reference + self.process
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def shape_from_config(config) -> Shape:
    """A Shape from a transformers config, counting parameters on the meta device (no memory)."""
    from raylm.planning.models import meta_model

    params = sum(p.numel() for p in meta_model(config).parameters())
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return Shape(
        params=params,
        layers=getattr(config, "num_hidden_layers", None) or config.n_layer,
        hidden=hidden,
        heads=getattr(config, "num_attention_heads", None) or config.n_head,
        intermediate=getattr(config, "intermediate_size", None)
        or getattr(config, "n_inner", None)
        or 4 * hidden,
        vocab=config.vocab_size,
    )


def shape_from_params(params: float, vocab: int = 32000) -> Shape:
    """A Shape from a parameter count alone, with Llama-like proportions (layers ~ hidden / 128).

    From params ~ 12 * layers * hidden^2: a 1B model comes out at hidden 2176, 18 layers.
    """
    hidden = max(64, round((params * 128 / 12) ** (1 / 3) / 64) * 64)
    layers = max(1, round(params / (12 * hidden * hidden)))
    return Shape(
        params=int(params),
        layers=layers,
        hidden=hidden,
        heads=max(1, hidden // 128),
        intermediate=int(8 * hidden / 3),
        vocab=vocab,
    )


def activation_bytes(
    shape: Shape,
    batch: int,
    seq_len: int,
    precision: str,
    gradient_checkpointing: bool,
    flash_attention: bool = False,
) -> float:
    """Activations kept for backward by one worker for one micro-batch, logits and loss included.

    Per decoder layer (element counts): the block input, two norm outputs, q/k/v and rotated q/k,
    the attention output: ~10 x (tokens x hidden); the MLP's gate, up, activation and product:
    4 x (tokens x intermediate); attention scores and probabilities, 2 x (batch x heads x seq^2),
    unless a flash kernel keeps only their log-sum-exp. With gradient checkpointing only the
    block inputs stay, plus one block recomputed at a time. The LM head keeps fp32 logits and their
    log-softmax (2 x tokens x vocab x 4 bytes).
    """
    element = 4 if precision == "fp32" else 2
    tokens = batch * seq_len
    per_layer = layer_activation_bytes(shape, batch, seq_len, precision, flash_attention)
    layers = (
        tokens * shape.hidden * element * shape.layers + per_layer
        if gradient_checkpointing
        else per_layer * shape.layers
    )
    logits = 3 * tokens * shape.vocab * 4  # fp32 logits, log-softmax, and their gradient in backward
    return float(layers + logits)


def layer_activation_bytes(
    shape: Shape, batch: int, seq_len: int, precision: str, flash_attention: bool = False
) -> float:
    """One decoder layer's activations for one micro-batch (the elements activation_bytes lists)."""
    element = 4 if precision == "fp32" else 2
    per_layer = batch * seq_len * (10 * shape.hidden + 4 * shape.intermediate) * element
    if not flash_attention:
        per_layer += 2 * batch * shape.heads * seq_len * seq_len * element  # scores and probabilities
    return per_layer


def bytes_per_parameter(strategy: str, precision: str, dtype: str = "float32") -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes per trained parameter under ddp or fsdp (the ZeRO stages:
    zero_estimate).

    - fsdp with bf16 keeps the sharded weights (the master copy) and the reduced gradients in fp32
      and gathers bf16 copies for compute (model.dtype: bfloat16 loads in 16 bits, then upcasts): 4, 4, 8.
    - Otherwise weights, gradients and AdamW's two moments are in model.dtype; autocast computes in
      16 bits but stores nothing in them: 4, 4, 8 in float32, 2, 2, 4 in bfloat16 / float16.
    """
    if strategy == "fsdp" and precision == "bf16":
        return 4, 4, 8
    element = 4 if dtype == "float32" else 2
    return element, element, 2 * element


# ZeRO-3 settings DeepSpeed reads by either name, `<name>` or `stage3_<name>`; the stage3_ one wins
ZERO3_NAMES = ("prefetch_bucket_size", "param_persistence_threshold", "max_live_parameters")


def zero_sizes(hidden: int, asked: dict | None = None) -> dict:
    """The DeepSpeed bucket sizes raylm writes for a model of `hidden` size, as Hugging Face's DeepSpeed
    integration fills its `auto` values, so a small and a large model both get a predictable peak
    (DeepSpeed's own defaults are fixed element counts: 5e8 for the reduce bucket, ~1.9 GiB in fp32).
    A size the user's zero_optimization `asked` sets under DeepSpeed's plain ZeRO-3 name is left out:
    raylm's stage3_ one would win over it."""
    sized = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    plain = {name for name in ZERO3_NAMES if name in (asked or {})}
    return {key: value for key, value in sized.items() if key.removeprefix("stage3_") not in plain}


def zero_estimate(
    shape: Shape,
    stage: int,
    precision: str,
    workers: int,
    trained: float,
    activations: float,
    weight_bits: float | None,
    dtype: str,
    zero: dict | None,
    offload_optimizer: bool,
    teacher: float,
    gpu: bool,
) -> Breakdown:
    """Per-worker memory of DeepSpeed ZeRO `stage` with the zero_optimization settings `zero` (raylm's
    generated sizes, zero_sizes, with the spec's overrides; DeepSpeed's defaults for the rest).

    What DeepSpeed 0.19 allocates (stage_1_and_2.py, stage3.py), measured on an H200 for one rank:
    the module in 16 bits under bf16 / fp16 (else its dtype); an fp32 master partition of the trained
    weights (a clone, also in fp32 runs) and AdamW's two moments: 12 bytes per trained parameter / N.
    ZeRO-1 and -2 keep a contiguous gradient partition in the module's dtype between steps, ZeRO-3 one
    in fp32 (these persist through backward, beside the activations); the step adds 8 bytes / N on a
    GPU; on a CPU worker the optimizer reads an fp32 gradient partition (a 16-bit one is copied to fp32,
    stage_1_and_2.py `step`) and torch's AdamW makes two partition-sized temporaries: 12 bytes / N beside
    the 16-bit partition, which is freed only after the last parameter group's step (one contiguous
    buffer holds every group's partition, and raylm passes two groups: decay, then norms and biases;
    measured with 2 ranks: one group frees it before the step, two keep it). ZeRO-3 partitions the module too;
    each rank holds what it gathered, up to stage3_max_live_parameters, and the parameters under the
    persistence threshold whole. Buckets: the reduce bucket (x2 with overlap_comm, ZeRO-3's default).
    With offload_optimizer the master weights, moments, gradient partitions and the step live in host
    memory (`host`); on a CPU worker, where the host is the worker's memory, they persist there beside
    ZeRO-1/2's 16-bit copy of the partition and two largest-parameter gradient buffers, and AdamW's two
    temporaries come only at the step (they do not add to the activations)."""
    zero = {**zero_sizes(shape.hidden), **(zero or {})}
    n = workers
    module = 2 if precision != "fp32" or dtype != "float32" else 4
    frozen = shape.params - trained
    frozen_bytes = frozen * (weight_bits / 8 if weight_bits else module)
    reduce = min(float(zero["reduce_bucket_size"]), trained)
    overlap = zero.get("overlap_comm", stage == 3)
    buckets = reduce * 4 * (2 if overlap else 1)
    step_state = 12 * trained / n
    if stage < 3:
        weights = trained * module + frozen_bytes
        # DeepSpeed 0.19 runs ZeRO-1 and -2 through one optimizer: both keep a contiguous gradient
        # partition between steps (measured alike on CPU with 2 ranks and on a GPU)
        gradients = trained * module / n
    else:
        # every rank holds the full parameters it gathered, up to stage3_max_live_parameters (DeepSpeed's
        # and Hugging Face's default 1e9: a smaller model stays gathered through the forward pass)
        live = min(float(zero.get("stage3_max_live_parameters", 1e9)), shape.params)
        gathered = live * module if n > 1 else 0.0
        # the norms' weights (hidden each) under the persistence threshold stay whole on every rank
        norms = (2 * shape.layers + 1) * shape.hidden
        persistent = norms * module if zero["stage3_param_persistence_threshold"] >= shape.hidden else 0.0
        weights = (trained * module + frozen_bytes) / n + gathered + persistent
        gradients = 4 * trained / n  # fp32 gradient partitions, allocated once
    # torch's AdamW on a CPU (single-tensor: the square root, then the division) makes two
    # partition-sized temporaries; on an H200 the step measured the same 8 bytes / N beside the gradient
    # partition, fp32 and bf16 alike
    adamw = 8 * trained / n
    # a CPU worker's step also reads an fp32 gradient partition: in fp32 runs and at ZeRO-3 the partition
    # itself; of a 16-bit ZeRO-1/2 partition an fp32 copy, made while the 16-bit one still lives (it goes
    # after the last parameter group's step)
    fp32_copy = 4 * trained / n if stage < 3 and module != 4 else 0.0
    temporary = adamw if gpu else adamw + fp32_copy
    host = 0.0
    if offload_optimizer and gpu:  # the master, the fp32 gradient partitions and the CPU AdamW on the host
        host = step_state + adamw + 4 * trained / n
        step_state = temporary = gradients = 0.0
    elif offload_optimizer:  # a CPU worker: the host is its memory, so offloading moves nothing out of it
        # persistent: the fp32 gradient partitions and a module-dtype copy of the weight partition (ZeRO-1/2:
        # the buffer its step copies the master into, stage_1_and_2.py cpu_offload; ZeRO-3 measured the same
        # bytes); ZeRO-1/2 also two gradient buffers of the largest parameter. AdamW's temporaries come
        # at the step only.
        gradients = 4 * trained / n + trained * module / n
        if stage < 3:
            largest = max(shape.vocab, shape.intermediate) * shape.hidden
            gradients += 2 * min(largest, trained) * module
        temporary = adamw
    return Breakdown(
        weights=weights,
        gradients=gradients,
        optimizer=step_state,
        activations=activations,
        temporary=temporary,
        buckets=buckets,
        teacher=teacher,
        host=host,
        gradients_persist=True,
    )


def estimate(
    shape: Shape,
    strategy: str,
    precision: str = "fp32",
    workers: int = 1,
    batch: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = False,
    trainable: int | None = None,
    flash_attention: bool = False,
    weight_bits: float | None = None,
    dtype: str = "float32",
    teacher: float = 0.0,
    zero: dict | None = None,
    offload_optimizer: bool = False,
    gpu: bool = False,
    reference: float = 0.0,
) -> Breakdown:
    """Per-worker training memory of `shape` under `strategy` on `workers` data-parallel workers,
    with the weights loaded in `dtype` (model.dtype) and `precision` (train.precision). The ZeRO
    stages: zero_estimate, with `zero` (the spec's zero_optimization overrides) and `offload_optimizer`.
    `gpu`: CUDA workers, where ddp's AdamW runs fused (raylm.train.optim.adamw) and its step allocates no
    temporaries (DeepSpeed steps torch's unfused AdamW on either; fsdp's temporary term stays, as
    measured on one H200 rank, where it also covers FSDP2's unsharded root and blocks).

    `trainable` parameters (default all) carry gradients and AdamW state (bytes_per_parameter); a
    frozen base (LoRA) only weights, in `dtype` (16 bits under DeepSpeed's bf16 / fp16), or
    `weight_bits` per parameter when quantised (QLoRA: raylm.methods.qlora.QUANT_BITS). `flash_attention`: attention
    kernels that keep no seq^2 scores: SDPA on CUDA, and on a CPU too (torch's CPU flash kernel, in fp32
    and bf16, with or without a padding mask); eager attention keeps them. fsdp and ZeRO-3 also hold the
    gathered weights of two blocks at a time (the one computing and the one prefetched). `teacher`:
    bytes of a distillation teacher on every worker (teacher_bytes). `reference`: bytes of a whole
    frozen copy of the starting model (a preference run's reference for full / freeze fine-tuning),
    sharded like the policy under fsdp and ZeRO-3, whole on every worker otherwise. A CPU worker's peak
    also holds its process's own memory beyond the model (`process`: CPU_PROCESS).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    trained = shape.params if trainable is None else trainable
    mixed = precision != "fp32" or dtype != "float32"
    activations = activation_bytes(
        shape, batch, seq_len, "bf16" if mixed else "fp32", gradient_checkpointing, flash_attention
    )
    held = reference / workers if strategy in ("fsdp", "zero3") else reference
    process = 0.0 if gpu else cpu_process_bytes(mixed)
    if strategy.startswith("zero"):
        return replace(
            zero_estimate(
                shape,
                int(strategy[-1]),
                precision,
                workers,
                trained,
                activations,
                weight_bits,
                dtype,
                zero,
                offload_optimizer,
                teacher,
                gpu,
            ),
            reference=held,
            process=process,
        )
    weight_bytes, gradient_bytes, optimizer_bytes = bytes_per_parameter(strategy, precision, dtype)
    frozen = shape.params - trained
    weights = trained * weight_bytes + frozen * (
        weight_bits / 8 if weight_bits else 4 if dtype == "float32" else 2
    )
    shard = workers if strategy == "fsdp" else 1
    gathered = 0.0
    if shard > 1:  # fsdp gathers the block computing and the one prefetched
        compute_bytes = 2 if precision != "fp32" else weight_bytes
        block = max(0, shape.params - 2 * shape.vocab * shape.hidden) / max(1, shape.layers)
        gathered = 2 * block * compute_bytes
    return Breakdown(
        weights=weights / shard,
        gradients=trained * gradient_bytes / shard,
        optimizer=trained * optimizer_bytes / shard,
        activations=activations,
        # AdamW's multi-tensor (foreach) step holds one more moment-sized copy of the (local) trained
        # parameters; ddp's fused CUDA kernel none
        temporary=(0 if gpu and strategy == "ddp" else trained * (optimizer_bytes // 2) / shard) + gathered,
        buckets=trained * gradient_bytes if strategy == "ddp" and workers > 1 else 0.0,
        teacher=teacher,
        reference=held,
        process=process,
    )


def teacher_bytes(teacher: Shape, dtype: str, batch: int, seq_len: int) -> float:
    """A frozen distillation teacher, whole on every worker whatever the strategy (raylm/train/distill.py):
    its weights in `dtype`, and per micro-batch its float32 logits, their log-softmax and probabilities,
    plus the student's log-softmax that backward keeps (its layer activations are freed as the
    no-grad forward goes)."""
    return teacher.params * (4 if dtype == "float32" else 2) + 4 * batch * seq_len * teacher.vocab * 4


def shape_of_job(job) -> Shape:
    """The Shape of a job's model: its architecture block, or the config.json of its folder."""
    from raylm.planning.models import model_config

    return shape_from_config(model_config(job))


def report(
    shape: Shape,
    workers: int,
    precision: str,
    batch: int,
    seq_len: int,
    gradient_checkpointing: bool,
    flash_attention: bool,
    gpu_memory_gb: float | None,
    dtype: str = "float32",
    teacher: float = 0.0,
    method: dict | None = None,
    gpu: bool = False,
    reference: float = 0.0,
) -> str:
    """A table of per-worker GiB by strategy, and which strategies fit in `gpu_memory_gb`. `method`:
    a fine-tuning method's terms (raylm.planning.plan.method_terms: trainable parameters, a quantised base's
    bits, the strategies it cannot run under), as `strategy: auto` counts them."""
    method = method or {}
    breakdowns = {
        strategy: estimate(
            shape,
            strategy,
            precision,
            workers,
            batch,
            seq_len,
            gradient_checkpointing,
            method.get("trainable"),
            flash_attention,
            method.get("weight_bits"),
            dtype=dtype,
            teacher=teacher,
            zero=method.get("zero"),
            offload_optimizer=method.get("offload_optimizer", False),
            gpu=gpu,
            reference=reference,
        )
        for strategy in STRATEGIES
    }
    unit, scale = ("GiB", GiB) if breakdowns["ddp"].total >= GiB else ("MiB", 1024**2)
    frozen_name = "teacher" if teacher else "reference" if reference else ""  # a frozen second model
    lines = [
        f"model: {shape.params / 1e6:,.1f}M parameters ({shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}); "
        f"{workers} worker(s), {precision} ({dtype} weights), batch {batch} x {seq_len} tokens"
        + (", gradient checkpointing" if gradient_checkpointing else "")
        + (", flash attention" if flash_attention else ", attention scores kept (no flash kernel)")
        + (", GPU workers (ddp steps a fused AdamW)" if gpu else ", CPU workers"),
        f"weights alone: {shape.params * (4 if dtype == 'float32' else 2) / scale:.2f} {unit} in {dtype}"
        + (
            f"; the distillation teacher adds {teacher / scale:.2f} {unit} to every worker's peak"
            if teacher
            else ""
        )
        + (
            f"; the preference objective's frozen reference copy adds {reference / scale:.2f} {unit} "
            "(sharded under fsdp)"
            if reference
            else ""
        )
        + (
            f"; {method['trainable'] / 1e6:,.2f}M of them train"
            + (f", the frozen base in {method['weight_bits']:.3g} bits" if method.get("weight_bits") else "")
            if method.get("trainable") is not None
            else ""
        ),
        "",
        f"{'strategy':<9}{'weights':>10}{'grads':>10}{'optimizer':>11}{'activations':>13}{'temporary':>11}"
        f"{'buckets':>9}"
        + (f"{frozen_name:>11}" if frozen_name else "")
        + ("" if gpu else f"{'process':>9}")
        + f"{'peak ' + unit:>11}"
        + ("  fits" if gpu_memory_gb else ""),
    ]
    for strategy, b in breakdowns.items():
        row = (
            f"{strategy:<9}{b.weights / scale:>10.2f}{b.gradients / scale:>10.2f}{b.optimizer / scale:>11.2f}"
            f"{b.activations / scale:>13.2f}{b.temporary / scale:>11.2f}{b.buckets / scale:>9.2f}"
            + (f"{(b.teacher + b.reference) / scale:>11.2f}" if frozen_name else "")
            + ("" if gpu else f"{b.process / scale:>9.2f}")
            + f"{b.total / scale:>11.2f}"
        )
        if gpu_memory_gb:
            row += "  yes" if b.total <= gpu_memory_gb * GiB else "  no"
        if strategy in method.get("exclude", ()):
            row += "  (this job cannot run under it)"
        if b.host:
            row += f"  (+{b.host / scale:.2f} {unit} of optimizer state in host memory)"
        lines.append(row)
    lines += [
        "",
        "peak = weights + optimizer + the larger of activations and grads + temporary (the step's) + buckets"
        + (" + teacher" if teacher else "")
        + (" + reference" if reference else "")
        + (
            ""
            if gpu
            else " + process (a CPU worker's own memory: the libraries' code and caches, the data reader)"
        )
        + "; ZeRO rows: weights + optimizer + grads + the larger of activations and temporary + buckets "
        "(DeepSpeed's gradient partitions live through backward; its fp32 master partition is in optimizer, "
        "the fp32 gradients its step reads in temporary, its reduce bucket as raylm sizes it from hidden)"
        + (" with the spec's zero_optimization settings" if method.get("zero") else "")
        + (", optimizer state offloaded to the host" if method.get("offload_optimizer") else "")
        + ".",
    ]
    return "\n".join(lines)
