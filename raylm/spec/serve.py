"""`kind: serve`: a Ray Serve application with an OpenAI-compatible API over a raylm model.

kind: serve
model: {path: runs/quickstart}            # model / run / adapter folder, GGUF, bnb or GPTQ model
adapters: {support: runs/lora-support}    # LoRA adapters over that base, addressed by model name
http: {host: 127.0.0.1, port: 8000}       # an API key (RAYLM_API_KEY) is required off loopback
batching: {max_batch_size: 8, batch_wait_timeout_s: 0.01}
scaling: {replicas: 1, cpus_per_replica: 1, max_ongoing_requests: 16, max_queued_requests: 64}
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

from pydantic import Field, field_validator, model_validator

from raylm.spec.generation import GenerationSpec, StrategySpec
from raylm.spec.sections import Section, path_shorthand


class ServedModel(Section):
    path: str = Field(
        description="A model folder (full, bitsandbytes or GPTQ), an adapter folder, a GGUF file or a raylm run folder."
    )
    base: str | None = Field(
        None, description="Base model folder of an adapter (default: the one it was trained on)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights' dtype in the replica: auto keeps the checkpoint's own (a bf16 checkpoint "
        "stays bf16; a GGUF file is de-quantized to float32).",
    )


class HttpSpec(Section):
    host: str = Field("127.0.0.1", description="Address the HTTP server binds to (0.0.0.0: every interface).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    proxy: Literal["head", "every_node"] = Field(
        "head",
        description="Where Serve runs its HTTP proxy: the head node only (the URL printed), or every node "
        "(put a load balancer in front).",
    )
    route_prefix: str = Field(
        "/",
        pattern=r"^/[A-Za-z0-9_./-]*$",
        description="Path the API lives under (several models on one server).",
    )
    request_timeout_s: float = Field(
        120.0, gt=0, le=86_400, description="A request still unanswered after this gets 408."
    )
    api_key_env: str = Field(
        "RAYLM_API_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the API key (Authorization: Bearer KEY).",
    )
    api_key_file: str | None = Field(
        None, description="A file holding the API key (instead of the variable)."
    )


class BatchingSpec(Section):
    max_batch_size: int = Field(
        8, ge=1, le=512, description="Requests generated together at most (1: no batching)."
    )
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=10, description="How long a batch waits for more requests before it starts."
    )
    max_cached_tokens: int | None = Field(
        None,
        ge=1,
        description="Key/value-cache budget of a replica, in tokens (rows x padded length, each row "
        "counted at its prompt + max_tokens): requests past it wait for rows to finish; one that could "
        "never fit gets 400. Default: what fits in 80% of the GPU memory free after loading (on CPU, "
        "half the available RAM).",
    )
    compile: bool = Field(
        False,
        description="Run the decoding step through torch.compile: about twice the tokens/s for one "
        "stream of a small model on a CPU; adds ~20-40 s to a replica's start (torch compiles C++: needs "
        "gcc). Models with LoRA adapters loaded decode uncompiled.",
    )


class AutoscalingSpec(Section):
    min_replicas: int = Field(1, ge=0, le=1024)
    max_replicas: int = Field(2, ge=1, le=1024)
    target_ongoing_requests: float = Field(
        4, gt=0, description="Requests per replica the autoscaler aims at."
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )
        return self


class ScalingSpec(Section):
    replicas: int = Field(1, ge=1, le=1024, description="Fixed number of replicas (without autoscaling).")
    autoscaling: AutoscalingSpec | None = Field(None, description="Replica bounds instead of a fixed number.")
    cpus_per_replica: float = Field(1.0, gt=0, le=1024)
    gpus_per_replica: float = Field(0.0, ge=0, le=64)
    max_ongoing_requests: int = Field(
        16, ge=1, le=100_000, description="Requests a replica works on at once."
    )
    max_queued_requests: int = Field(
        64,
        ge=0,
        le=1_000_000,
        description="Requests waiting for a replica; past this the server answers 503 at once.",
    )


class ServeJob(Section):
    kind: Literal["serve"]
    name: str | None = Field(
        None, description="Model name in the API and Serve application name; default: the folder's name."
    )
    model: ServedModel
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapter folders over the model, by the model name that selects them.",
    )
    max_adapters_per_replica: int = Field(
        4, ge=1, le=1024, description="Adapters a replica keeps loaded (least recently used go)."
    )
    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="transformers (CPU or GPU, every format raylm writes) or vllm (ray.serve.llm, GPUs).",
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template (or a file holding one) for models whose tokenizer has none."
    )
    defaults: GenerationSpec = Field(
        default_factory=GenerationSpec, description="Generation controls for what a request leaves out."
    )
    max_tokens_limit: int = Field(4096, ge=1, description="The largest max_tokens a request may ask for.")
    strategies: list[StrategySpec] = Field(
        default_factory=list, description="Prompting strategies a request may name (`strategy` in its body)."
    )
    http: HttpSpec = Field(default_factory=HttpSpec)
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)

    _model_shorthand = field_validator("model", mode="before")(lambda cls, v: path_shorthand(v))

    @model_validator(mode="after")
    def _consistent(self) -> ServeJob:
        names = [s.name for s in self.strategies]
        if len(set(names)) != len(names):
            raise ValueError(f"strategies: each name once ({', '.join(names)})")
        if self.model_name in self.adapters:
            raise ValueError(
                f"adapters: {self.model_name!r} is the base model's name; name the adapter otherwise"
            )
        if self.engine == "vllm" and (self.adapters or self.strategies):
            raise ValueError("engine vllm: adapters and strategies are served by engine: transformers")
        return self

    @property
    def model_name(self) -> str:
        return self.name or PurePosixPath(self.model.path.rstrip("/")).name or "model"

    @property
    def run_name(self) -> str:
        return self.model_name

    @property
    def cpus_needed(self) -> float:
        replicas = (
            self.scaling.autoscaling.max_replicas if self.scaling.autoscaling else self.scaling.replicas
        )
        return replicas * self.scaling.cpus_per_replica
