"""Sections of a finetune job: supervised data, evaluation and output."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raylm.spec.sections import OutputSpec, Section, SourceSpec


class GeneratedTask(Section):
    """A supervised task raylm generates (no downloads): answers a base model has not seen."""

    task: Literal["arithmetic", "recall", "reverse", "copy"] = Field(
        "arithmetic",
        description="arithmetic: 'Q: 23+58=' -> ' 81'; recall: look a key up in a listed table; reverse: "
        "three words in reverse order; copy: '17. Say: kite' -> ' kite'. With "
        "data.format: choices, the right answer among data.num_choices.",
    )
    examples: int = Field(2000, ge=10, description="Number of examples.")
    seed: int = Field(0, description="Seed of the generator.")


class SFTDataSpec(SourceSpec):
    """Supervised examples: JSONL / Parquet / save_to_disk files, or a generated task."""

    generate: GeneratedTask | None = Field(None, description="a task raylm generates")
    format: Literal["completion", "alpaca", "chat", "choices", "preference", "kto"] = Field(
        "completion",
        description="completion: prompt/completion fields; alpaca: instruction/input/output; chat: a "
        "messages list; choices: a prompt, a list of choices and the index of the right one; "
        "preference: a prompt, a chosen and a rejected answer (text, or chat messages); kto: a prompt, "
        "a completion and whether it is desirable (label: true/false).",
    )
    prompt_field: str = Field("prompt", description="completion format: the prompt column.")
    completion_field: str = Field("completion", description="completion format: the response column.")
    messages_field: str = Field("messages", description="chat format: the column of {role, content} lists.")
    choices_field: str = Field("choices", description="choices format: the column of answer choices.")
    answer_field: str = Field("answer", description="choices format: the index of the right choice.")
    chosen_field: str = Field("chosen", description="preference format: the preferred answer's column.")
    rejected_field: str = Field("rejected", description="preference format: the rejected answer's column.")
    label_field: str = Field(
        "label", description="kto format: the column saying the completion is desirable."
    )
    num_choices: int = Field(
        4, ge=2, le=8, description="choices format: choices per example (every example has this many)."
    )
    chat_template: str | None = Field(
        None, description="chat format: a Jinja chat template; default the tokenizer's own."
    )
    seq_len: int = Field(256, ge=8, description="Tokens per example (longer ones are cut from the right).")
    loss_on: Literal["response", "all"] = Field(
        "response", description="Train on the response tokens only (default), or on prompt and response."
    )
    packing: bool = Field(
        False,
        description="Concatenate examples into full seq_len rows (fewer pad tokens; attention crosses examples).",
    )
    val_fraction: float = Field(
        0.1, ge=0.0, lt=0.9, description="Fraction of examples held out for validation."
    )
    padding: Literal["longest", "max_length"] = Field(
        "longest",
        description="Pad each batch to its longest example (less compute), or every row to seq_len "
        "(fixed shapes, e.g. for train.compile without recompiles).",
    )
    group_by_length: bool = Field(
        False,
        description="Batch examples of similar length together (with dynamic padding, less padding "
        "computed): after shuffling, examples are sorted by length within runs of 64 batches.",
    )

    @model_validator(mode="after")
    def _grouping_needs_rows(self) -> SFTDataSpec:
        if self.group_by_length and self.packing:
            raise ValueError("group_by_length groups unpacked examples: use it or packing, not both")
        if self.format in ("choices", "preference", "kto") and (self.packing or self.group_by_length):
            raise ValueError(
                f"{self.format} data keeps each example's answers together: no packing or group_by_length"
            )
        if self.format in ("preference", "kto") and self.loss_on == "all":
            raise ValueError(
                f"{self.format} data scores the answers only (their log-probabilities given the prompt): "
                "remove loss_on: all"
            )
        return self

    @property
    def preference(self) -> bool:
        """Pairs or unpaired feedback: trained with a preference objective."""
        return self.format in ("preference", "kto")


class EvalSpec(Section):
    """Evaluation beside the validation loss: exact match of greedy answers on held-out examples."""

    exact_match_examples: int = Field(
        64, ge=0, description="Held-out examples answered greedily before and after training; 0 turns it off."
    )
    max_new_tokens: int = Field(16, ge=1, description="Answer length limit for exact match.")
    during_training: bool = Field(
        False,
        description="Also answer the held-out examples at every evaluation (train.eval_every), logged as "
        "exact_match (a search can then stop trials on it); costs a greedy generation per evaluation.",
    )


class FinetuneOutput(OutputSpec):
    """Where the run writes checkpoints, metrics and the adapter (or model)."""

    merge: bool = Field(
        False, description="Also write merged/: the base with the adapter merged in (lora, qlora, ia3)."
    )
