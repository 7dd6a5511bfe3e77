"""Job specs. `TrainingJob` holds what every training kind shares; each kind adds its own sections.

The registry of kinds (spec model + driver) is raylm.kinds; `kind` selects the model.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

from pydantic import Field, field_validator, model_validator

from raylm.methods import METHODS, MethodSpec, mergeable, refusal
from raylm.spec.preference import PreferenceSpec
from raylm.spec.sections import (
    DataSpec,
    FailureSpec,
    LoggingSpec,
    ModelSpec,
    OutputSpec,
    ResourcesSpec,
    Section,
    TokenizerSpec,
    TrainSpec,
    path_shorthand,
)
from raylm.spec.sft import EvalSpec, FinetuneOutput, SFTDataSpec
from raylm.spec.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, StrategySpec


def _named(value):
    """`strategy: fsdp` means `{name: fsdp}`; `method: lora` means `{name: lora}`."""
    return {"name": value} if isinstance(value, str) else value


class TrainingJob(Section):
    """What every job that trains on Ray Train has: a model, a tokenizer, the loop's settings,
    resources, a strategy, an output folder and fault tolerance. Kinds add `kind` and `data`."""

    kind: str
    name: str | None = Field(
        None, description="Run name (Ray Train run and job id prefix); default: the output folder's name."
    )
    model: ModelSpec
    tokenizer: TokenizerSpec = Field(
        default_factory=TokenizerSpec,
        description="Tokenizer folder or training; default: the model folder's tokenizer.",
    )
    train: TrainSpec = Field(default_factory=TrainSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    strategy: StrategySpec = Field(
        default_factory=lambda: DDPStrategy(name="ddp"),
        description="Distributed strategy: ddp, fsdp, deepspeed (ZeRO 1-3) or auto (from the memory estimate).",
    )
    output: OutputSpec
    failure: FailureSpec = Field(default_factory=FailureSpec)
    logging: LoggingSpec = Field(
        default_factory=LoggingSpec, description="Experiment tracking: TensorBoard, MLflow, W&B."
    )

    _output_shorthand = field_validator("output", mode="before")(lambda cls, v: path_shorthand(v))
    _strategy_shorthand = field_validator("strategy", mode="before")(lambda cls, v: _named(v))

    @model_validator(mode="after")
    def _runnable(self) -> TrainingJob:
        if self.train.precision == "fp16" and not self.resources.use_gpu:
            raise ValueError("train.precision fp16 needs resources.use_gpu: true; on CPU use bf16 or fp32")
        if isinstance(self.strategy, FSDPStrategy) and self.train.precision == "fp16":
            raise ValueError(
                "strategy fsdp runs fp32 or bf16 (fp16 needs loss scaling, which raylm does under ddp and "
                "deepspeed): set train.precision: bf16"
            )
        if (
            isinstance(self.strategy, DDPStrategy)
            and self.model.dtype != "float32"
            and self.trains_base_weights
        ):
            raise ValueError(
                f"strategy ddp with model.dtype {self.model.dtype}: ddp's optimizer steps the {self.model.dtype} "
                "weights themselves (no float32 master copy, unlike fsdp and deepspeed), so small updates "
                "round away and the same spec would train differently by strategy; keep model.dtype "
                "float32 with train.precision bf16 (autocast), or use fsdp or deepspeed"
            )
        if self.model.attention == "flash_attention_2" and not self.resources.use_gpu:
            raise ValueError(
                "model.attention flash_attention_2 runs on GPUs only: set resources.use_gpu: true, or "
                "use sdpa (the default) or eager on CPU"
            )
        if self.train.compile and isinstance(self.strategy, DeepSpeedStrategy):
            raise ValueError(
                "train.compile with strategy deepspeed: DeepSpeed wraps the model in its own engine, "
                "which raylm does not compile; use ddp or fsdp, or leave compile off"
            )
        if self.train.keep_sparsity and isinstance(self.strategy, DeepSpeedStrategy):
            raise ValueError(
                "train.keep_sparsity with strategy deepspeed: ZeRO keeps its own flat copies of the "
                "weights, which raylm does not mask; use ddp or fsdp"
            )
        if self.resources.elastic and isinstance(self.strategy, DeepSpeedStrategy):
            raise ValueError(
                "elastic resources.num_workers [min, max] needs strategy ddp or fsdp: DeepSpeed's ZeRO "
                "checkpoints cannot be reloaded by a different number of workers"
            )
        return self

    @property
    def run_name(self) -> str:
        return self.name or PurePosixPath(self.output.path.rstrip("/")).name or "raylm-run"

    @property
    def trains_base_weights(self) -> bool:
        """Whether the optimizer steps the model's own weights (in model.dtype), not added ones."""
        return True

    @property
    def path_sections(self) -> tuple:
        """The sections whose local `path` the workers read (made absolute before they start)."""
        return (self.model, self.tokenizer)


class PretrainJob(TrainingJob):
    """Causal-LM pretraining on Ray Train (TorchTrainer), data streamed by Ray Data."""

    kind: Literal["pretrain"]
    data: DataSpec

    @model_validator(mode="after")
    def _context_holds_a_block(self) -> PretrainJob:
        if self.train.objective.tfew:
            raise ValueError(
                "train.objective unlikelihood / length_norm need multiple-choice fine-tuning data"
            )
        arch = self.model.architecture
        if arch is not None and arch.context < self.data.seq_len:
            raise ValueError(
                f"model.architecture.context ({arch.context}) is shorter than data.seq_len ({self.data.seq_len}): raise the context or lower seq_len"
            )
        return self


class FinetuneJob(TrainingJob):
    """Supervised fine-tuning of a model folder with one method (full, freeze, adapter, LoRA, QLoRA,
    IA3, P-Tuning, prefix or prompt tuning) on Ray Train."""

    kind: Literal["finetune"]
    method: MethodSpec = Field(description=f"What trains: {', '.join(METHODS)}.")
    data: SFTDataSpec
    preference: PreferenceSpec | None = Field(
        None,
        description="Preference optimisation (DPO, IPO, hinge, robust DPO, ORPO, SimPO, KTO) for "
        "data.format: preference or kto; default DPO (KTO for kto data).",
    )
    eval: EvalSpec = Field(default_factory=EvalSpec)
    output: FinetuneOutput

    _method_shorthand = field_validator("method", mode="before")(lambda cls, v: _named(v))

    @property
    def trains_base_weights(self) -> bool:
        return self.method.name in ("full", "freeze")

    @model_validator(mode="after")
    def _preference_fits_the_data(self) -> FinetuneJob:
        if self.preference is None and self.data.preference:
            self.preference = PreferenceSpec()
        if self.preference is None:
            return self
        if self.preference.objective is None:  # the data's own objective
            self.preference.objective = "kto" if self.data.format == "kto" else "dpo"
        for field, message in self.preference.problems():
            raise ValueError(f"preference.{field} {message}")
        if self.preference.precompute_reference and self.model.path is None:
            raise ValueError(
                "preference.precompute_reference reads the starting model's weights: set model.path (a model "
                "built from model.architecture starts from random weights; use the live reference)"
            )
        if not self.data.preference:
            raise ValueError(
                "preference: trains on preferred and rejected answers: set data.format: preference "
                "(prompt, chosen, rejected) or kto (prompt, completion, label)"
            )
        if (self.preference.objective == "kto") != (self.data.format == "kto"):
            raise ValueError(
                "preference.objective kto learns from unpaired examples (data.format: kto); the other "
                "objectives from pairs (data.format: preference)"
                f": objective {self.preference.objective} with data.format {self.data.format}"
            )
        changes_base = (
            getattr(self.method, "train_norms", False) or getattr(self.method, "bias", "none") != "none"
        )
        if self.preference.uses_reference and changes_base and not self.trains_base_weights:
            raise ValueError(
                f"preference.objective {self.preference.objective} compares the policy with the base, which "
                f"method {self.method.name} gets by switching its adapter off; with trained norms or biases "
                "the base itself changes: set train_norms: false / bias: none, or use objective orpo or simpo"
            )
        return self

    @model_validator(mode="after")
    def _method_runs_here(self) -> FinetuneJob:
        if self.train.objective.tfew and self.data.format != "choices":
            raise ValueError(
                "train.objective unlikelihood / length_norm score wrong answers: they need data.format: "
                "choices (a prompt, choices and the right one's index)"
            )
        if self.train.keep_sparsity and self.method.name not in ("full", "freeze"):
            raise ValueError(
                f"train.keep_sparsity with method {self.method.name}: only methods that train the weights "
                "themselves (full, freeze) can keep their zeros; an adapter merged into them would fill them"
            )
        reason = refusal(self.method, self.strategy, self.train)
        if reason:
            raise ValueError(f"method {self.method.name} {reason}")
        if self.output.merge and self.method.name not in mergeable():
            raise ValueError(
                f"output.merge: method {self.method.name} cannot be merged into the base "
                f"(mergeable: {', '.join(mergeable())}); its output folder is already complete or loads onto the base"
            )
        check = getattr(METHODS[self.method.name], "check", None)
        if check is not None:
            check(self)
        return self


class TeacherSpec(Section):
    """The frozen model whose output distribution the student learns."""

    path: str = Field(
        description="Teacher model folder (Hugging Face, e.g. runs/big/model); its tokenizer is the student's."
    )
    trust_remote_code: bool = Field(False, description="Allow the teacher's custom modelling code.")


class DistillSpec(Section):
    """loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels)."""

    temperature: float = Field(1.0, gt=0, description="Softmax temperature T of both distributions.")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the distillation term (0: the student alone, on the labels)."
    )


class DistillJob(PretrainJob):
    """Knowledge distillation: a student (an architecture or a folder) trained on text against a frozen
    teacher's next-token distribution, on Ray Train like pretraining (any strategy, checkpoints, resume)."""

    kind: Literal["distill"]
    teacher: TeacherSpec
    distill: DistillSpec = Field(default_factory=DistillSpec)

    @property
    def path_sections(self) -> tuple:
        return (self.model, self.tokenizer, self.teacher)

    @model_validator(mode="after")
    def _teachers_tokenizer(self) -> DistillJob:
        """The student reads the teacher's tokens: its tokenizer is the teacher's unless one is given."""
        if self.tokenizer.train is not None:
            raise ValueError(
                "tokenizer.train: a distilled student reads the teacher's tokens; leave tokenizer out "
                "(the teacher's is used) or give tokenizer.path"
            )
        if self.tokenizer.path is None:
            self.tokenizer = TokenizerSpec(path=self.teacher.path)
        return self
