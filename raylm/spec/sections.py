"""Spec sections shared by job kinds: model, tokenizer, data, train, resources, output, failure.

Every field carries a description: it is the text of `raylm schema` and of error hints.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


def path_shorthand(value):
    """A bare string where a section with a `path` goes: `output: runs/x` means `output: {path: runs/x}`."""
    return {"path": value} if isinstance(value, str) else value


class Section(BaseModel):
    """Base of every spec block: unknown keys are errors (a typo must not silently do nothing)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # the storage URI a `path` was fetched from (raylm.runtime.storage.localize_inputs), not a field
    _source: str | None = PrivateAttr(default=None)


class Architecture(Section):
    """A model built from scratch (random init) instead of loaded from a folder or the hub."""

    family: Literal["llama", "gpt2"] = Field(
        "llama", description="Decoder family: llama (RoPE, RMSNorm, SwiGLU) or gpt2."
    )
    layers: int = Field(4, ge=1, le=1024, description="Number of transformer blocks.")
    heads: int = Field(4, ge=1, le=1024, description="Attention heads per block.")
    kv_heads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Key/value heads (grouped-query attention, llama only); default = heads.",
    )
    hidden: int = Field(
        128, ge=8, le=1 << 17, description="Hidden (embedding) size; must be divisible by heads."
    )
    intermediate: int | None = Field(
        None,
        ge=8,
        le=1 << 19,
        description="Feed-forward size; default 4*hidden (gpt2) or 8/3*hidden rounded up to a multiple of 32 "
        "(llama). The run's spec.yaml records the resolved value.",
    )
    context: int = Field(
        256, ge=8, le=1 << 22, description="Maximum sequence length (position embeddings / RoPE range)."
    )
    vocab_size: int | None = Field(
        None, ge=8, le=1 << 22, description="Vocabulary size; default = the tokenizer's."
    )
    tie_embeddings: bool = Field(False, description="Share input embedding and LM head weights.")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout probability. gpt2: on attention weights, residual outputs and embeddings "
        "(attn_pdrop, resid_pdrop, embd_pdrop); llama: on attention weights (attention_dropout, its only "
        "one). Default 0, as nanoGPT's and Llama's pretraining recipes use (transformers' GPT-2 default "
        "would be 0.1).",
    )
    norm_eps: float | None = Field(
        None,
        gt=0.0,
        le=0.1,
        description="Epsilon of the normalisation layers; default the family's: 1e-6 (llama RMSNorm), "
        "1e-5 (gpt2 LayerNorm).",
    )
    rope_theta: float | None = Field(
        None, gt=0.0, description="RoPE base frequency (llama only); default 10000."
    )
    init_std: float = Field(
        0.02,
        gt=0.0,
        le=1.0,
        description="Standard deviation of the random initialisation (initializer_range).",
    )

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> Architecture:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.kv_heads is not None:
            if self.family != "llama":
                raise ValueError("kv_heads is only supported by family: llama")
            if self.heads % self.kv_heads:
                raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        if self.rope_theta is not None and self.family != "llama":
            raise ValueError("rope_theta is only supported by family: llama (gpt2 learns its positions)")
        return self

    @model_validator(mode="after")
    def _family_defaults(self) -> Architecture:
        """Fill what the family decides, so the spec (and the run's record of it) holds every value the
        model is built from."""
        llama = self.family == "llama"
        if self.intermediate is None:
            self.intermediate = -(-int(8 * self.hidden / 3) // 32) * 32 if llama else 4 * self.hidden
        if self.norm_eps is None:
            self.norm_eps = 1e-6 if llama else 1e-5
        if self.rope_theta is None and llama:
            self.rope_theta = 10000.0
        return self


class ModelSpec(Section):
    """Where the model comes from: a local Hugging Face folder / hub id, or an architecture block."""

    path: str | None = Field(
        None,
        description="Local Hugging Face model folder, hub id, storage URI, or raylm run folder (what the run "
        "produced: runs/tiny means runs/tiny/model).",
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) when path is a hub id."
    )
    architecture: Architecture | None = Field(
        None, description="Build a new model from scratch with this shape."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the weights are kept in; mixed precision is train.precision."
    )
    attention: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None,
        description="Attention kernel: sdpa (PyTorch's scaled_dot_product_attention, transformers' "
        "default), eager (plain matmuls), flash_attention_2 (the flash-attn package, GPU only).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow custom modelling code shipped with the checkpoint (off: it runs arbitrary code).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.architecture is None):
            raise ValueError(
                "give exactly one of model.path (load weights) or model.architecture (build from scratch)"
            )
        return self


class TokenizerTraining(Section):
    """Train a tokenizer on the job's corpus before training starts."""

    type: Literal["bpe", "char"] = Field(
        "bpe", description="bpe: byte-level BPE; char: one token per character seen in the corpus."
    )
    vocab_size: int = Field(2048, ge=64, description="Target vocabulary size (bpe).")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    max_chars: int = Field(
        50_000_000, ge=1000, description="Train on at most this many characters of the corpus."
    )


class TokenizerSpec(Section):
    """A tokenizer folder, or training instructions; default: the model folder's tokenizer, else a BPE."""

    path: str | None = Field(None, description="Folder with a Hugging Face fast tokenizer (tokenizer.json).")
    train: TokenizerTraining | None = Field(None, description="Train a tokenizer on the corpus.")

    @model_validator(mode="after")
    def _not_both(self) -> TokenizerSpec:
        if self.path is not None and self.train is not None:
            raise ValueError("give tokenizer.path or tokenizer.train, not both")
        return self


class GeneratedCorpus(Section):
    """A corpus the project writes itself (no downloads): small templated stories."""

    documents: int = Field(3000, ge=10, description="Number of generated stories.")
    seed: int = Field(0, description="Seed of the story generator.")


class HubDataset(Section):
    """A dataset read by `datasets.load_dataset`: a hub id (network access, HF_TOKEN from the
    environment for gated ones), a local dataset folder, or a builder (json, parquet, text) with
    data_files."""

    name: str = Field(description="Hub id (org/name), local folder, or builder name (json, parquet, text).")
    config: str | None = Field(None, description="The dataset's configuration (subset) name.")
    split: str = Field("train", description="The split to read, e.g. train or train[:10%].")
    revision: str | None = Field(
        None, description="Hub revision (branch, tag, commit); pin it so the tokenized cache stays valid."
    )
    data_files: str | list[str] | None = Field(None, description="Files for a builder (json, parquet, text).")


class SourceSpec(Section):
    """Where a job's data comes from: your files, a dataset (hub or local), or something raylm
    generates (exactly one)."""

    path: str | list[str] | None = Field(
        None,
        description="A file, a folder of files, or a list of them, on disk or at a storage URI (s3://, gs://); "
        "hf://org/name reads a hub dataset.",
    )
    dataset: HubDataset | None = Field(None, description="A dataset read with datasets.load_dataset.")
    generate: Section | None = None  # each kind's data section says what it generates
    cache: str | None = Field(
        None,
        description="Folder or storage URI for the tokenized data (Parquet), keyed by the inputs' content, "
        "the tokenizer and the data settings; runs that share it tokenize once. Default: "
        "<output>/data-cache.",
    )
    shuffle_buffer: int = Field(
        1000,
        ge=0,
        description="Rows shuffled together each epoch (seeded by train.seed): the data is cut into windows "
        "of this many rows, visited in random order, each shuffled; 0 keeps the data's order.",
    )

    @field_validator("path")
    @classmethod
    def _paths_named(cls, value):
        paths = [value] if isinstance(value, str) else value
        if paths is not None and (not paths or any(not p.strip() for p in paths)):
            raise ValueError("give a file or folder (or a non-empty list of them), not an empty name")
        return value

    @model_validator(mode="before")
    @classmethod
    def _hub_path(cls, data):
        """`path: hf://org/name` is shorthand for `dataset: {name: org/name}`."""
        if isinstance(data, dict) and "dataset" not in data:
            path = data.get("path")
            if isinstance(path, str) and path.startswith("hf://") and len(path) > len("hf://"):
                data = {**{k: v for k, v in data.items() if k != "path"}, "dataset": {"name": path[5:]}}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> SourceSpec:
        if sum(x is not None for x in (self.path, self.dataset, self.generate)) != 1:
            noun = self.model_fields["generate"].description or "generated data"
            raise ValueError(
                "give exactly one of data.path (your files), data.dataset (datasets.load_dataset) or "
                f"data.generate ({noun})"
            )
        return self

    @property
    def paths(self) -> list[str]:
        if self.path is None:
            return []
        return [self.path] if isinstance(self.path, str) else list(self.path)


class DataSpec(SourceSpec):
    """Training text: files (text, JSONL, Parquet, datasets.save_to_disk folders) or a generated corpus."""

    generate: GeneratedCorpus | None = Field(
        None, description="a corpus raylm generates, for quickstarts and tests"
    )
    format: Literal["auto", "text", "jsonl", "parquet", "hf"] = Field(
        "auto",
        description="Input format; auto picks by file extension (.txt/.md, .jsonl/.json, .parquet, a save_to_disk folder).",
    )
    text_field: str = Field("text", description="Column holding the text (jsonl, parquet, hf).")
    seq_len: int = Field(256, ge=8, description="Tokens per packed training block.")
    val_fraction: float = Field(
        0.05, ge=0.0, lt=0.9, description="Fraction of packed blocks held out for validation."
    )
    add_eos: bool = Field(
        True,
        description="Append the EOS token after each document before packing (not per line of text files).",
    )
    val_blocks: int = Field(512, ge=1, description="At most this many packed blocks are kept for validation.")
    pack_batch_docs: int = Field(
        1024, ge=1, description="Documents tokenized and packed together per Ray Data batch."
    )


class ObjectiveSpec(Section):
    """Loss terms and their weights. unlikelihood and length_norm (T-Few) need data.format: choices."""

    lm: float = Field(1.0, ge=0, description="Cross-entropy of the response (the right choice's) tokens.")
    unlikelihood: float = Field(
        0.0, ge=0, description="T-Few's unlikelihood: -log(1 - p) on the wrong choices' tokens."
    )
    length_norm: float = Field(
        0.0,
        ge=0,
        description="T-Few's length-normalised loss: softmax over the choices' mean token log-likelihoods.",
    )

    @model_validator(mode="after")
    def _some_term(self) -> ObjectiveSpec:
        if self.lm == self.unlikelihood == self.length_norm == 0:
            raise ValueError("every objective weight is 0: give lm, unlikelihood or length_norm a weight")
        return self

    @property
    def tfew(self) -> bool:
        return bool(self.unlikelihood or self.length_norm)


class TrainSpec(Section):
    """The optimisation loop: length, batch, schedule, precision, intervals."""

    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to run (takes precedence over epochs)."
    )
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training split, when max_steps is not set."
    )
    batch_size: int = Field(8, ge=1, description="Sequences per worker per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Final learning rate of the cosine schedule, as a fraction of lr."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before the schedule.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warm-up."
    )
    weight_decay: float = Field(
        0.1, ge=0, description="AdamW weight decay (not applied to norms and biases)."
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this value; null disables."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast precision (fp16 needs a GPU)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    compile: bool = Field(
        False,
        description="torch.compile the training step (ddp, fsdp; CPU and GPU). The first steps pay the "
        "compilation; measure before turning it on (benchmarks/pretrain_overhead.py).",
    )
    keep_sparsity: bool = Field(
        False,
        description="Weights that are exactly zero in the starting model's decoder linear layers (a pruned "
        "model) stay zero while training: their gradients and values are masked (ddp, fsdp).",
    )
    seed: int = Field(0, description="Seed for weights, data order and dropout.")
    objective: ObjectiveSpec = Field(
        default_factory=ObjectiveSpec,
        description="Loss terms: {lm: 1, unlikelihood: 1, length_norm: 1} is T-Few's recipe (choices data).",
    )
    eval_every: int = Field(
        100, ge=1, description="Evaluate on the validation split every N steps (and at the end)."
    )
    eval_batches: int | None = Field(
        None, ge=1, description="Cap on validation batches per evaluation; default all."
    )
    checkpoint_every: int = Field(
        200, ge=1, description="Save a resumable checkpoint every N steps (and at the end)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on storage (oldest removed first).")
    log_every: int = Field(10, ge=1, description="Print and record metrics every N steps.")

    @model_validator(mode="after")
    def _length(self) -> TrainSpec:
        if self.max_steps is None and self.epochs is None:
            self.max_steps = 1000
        return self


class ResourcesSpec(Section):
    """What each Ray Train worker gets."""

    num_workers: int | tuple[int, int] = Field(
        1,
        description="Data-parallel training workers, or [min, max] for elastic training (ddp and fsdp): "
        "Ray Train starts with what it can get, at least min, and resizes the group after failures.",
    )
    use_gpu: bool = Field(
        False, description="Give each worker a GPU (NCCL backend) instead of CPU only (gloo)."
    )
    cpus_per_worker: float = Field(
        1, gt=0, description="CPUs reserved per worker; also its torch thread count."
    )
    gpus_per_worker: float = Field(
        1,
        description="GPUs per worker when use_gpu is true: one (each worker is one NCCL rank on one "
        "whole GPU; a fraction would put two ranks on one device, more would leave GPUs idle).",
    )

    @field_validator("gpus_per_worker")
    @classmethod
    def _one_gpu_per_rank(cls, value: float) -> float:
        if value != 1:
            raise ValueError(
                f"{value:g}: each worker is one NCCL rank and needs exactly one whole GPU (a fraction puts "
                "two ranks on one device, which NCCL refuses; more leaves GPUs idle): leave it at 1 and set "
                "num_workers to the number of GPUs"
            )
        return value

    placement: Literal["pack", "spread", "strict_spread"] = Field(
        "pack",
        description="Worker placement across nodes: pack (fewest nodes), spread (best effort), strict_spread (one per node).",
    )
    autoscale: bool = Field(
        False,
        description="The cluster adds nodes on demand (an autoscaler): start even when its present nodes "
        "cannot hold the workers, and wait for new ones. Otherwise such a job stops before it starts.",
    )
    shared_filesystem: bool = Field(
        False,
        description="Every node of the cluster sees the same filesystem (NFS, a shared volume): a local "
        "output path is then allowed on a multi-node cluster. Otherwise use a storage URI (s3://, gs://).",
    )

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value):
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError(f"need 1 <= workers (and min <= max), got {value}")
        return value

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def per_worker(self) -> dict[str, float]:
        """The Ray resources one worker reserves."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}


class FailureSpec(Section):
    """Fault tolerance: how often Ray Train restarts failed workers from the last checkpoint."""

    max_failures: int = Field(0, ge=-1, description="Worker-group restarts allowed (-1: unlimited).")


class OutputSpec(Section):
    """Where the run writes checkpoints, metrics and the final model."""

    path: str = Field(description="Run directory (local or shared filesystem) or storage URI (s3://, gs://).")


class MLflowLogging(Section):
    """MLflow tracking: one MLflow run per raylm run (a resumed run continues it)."""

    tracking_uri: str | None = Field(
        None,
        description="http(s)://server:5000, databricks, sqlite:///path.db, or a local path (a .db file: "
        "SQLite; else a folder store); default: $MLFLOW_TRACKING_URI, else sqlite:///<output>/mlflow.db.",
    )
    experiment: str = Field("raylm", min_length=1, description="Experiment name (created if missing).")


class WandbLogging(Section):
    """Weights & Biases: one W&B run per raylm run (a resumed run continues it)."""

    project: str = Field("raylm", min_length=1, description="W&B project.")
    entity: str | None = Field(None, description="W&B team or user; default: the API key's.")
    mode: Literal["online", "offline"] = Field(
        "online",
        description="online: stream to the server (needs WANDB_API_KEY); offline: files under "
        "<output>/wandb, uploaded later with `wandb sync`.",
    )


class LoggingSpec(Section):
    """Where metrics go besides metrics.jsonl: TensorBoard, MLflow, Weights & Biases."""

    tensorboard: bool = Field(True, description="TensorBoard event files under <output>/tensorboard.")
    mlflow: MLflowLogging | None = Field(None, description="Log to MLflow ({} for the defaults).")
    wandb: WandbLogging | None = Field(None, description="Log to Weights & Biases ({} for the defaults).")
