"""The `kind: evaluate` spec: models side by side on held-out perplexity and on task files.

```yaml
kind: evaluate
models: [runs/quickstart, {name: lora, path: runs/lora-arith}, runs/quickstart-nf4]
perplexity: {data: {path: heldout.txt, seq_len: 64}, blocks: 64}
tasks:
  - {name: arithmetic, data: {generate: {task: arithmetic, examples: 200}}, examples: 100}
output: runs/eval
```
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

from pydantic import Field, field_validator, model_validator

from raylm.spec.sections import DataSpec, OutputSpec, Section, path_shorthand
from raylm.spec.sft import SFTDataSpec


class EndpointSpec(Section):
    """A running OpenAI-compatible server (raylm's, vLLM's): its completions API with token-id prompts and
    echo + logprobs, the model's tokenizer here."""

    url: str = Field(description="The API's base URL, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(description="The model name the server answers to.")
    tokenizer: str = Field(
        description="The served model's tokenizer (a model folder or run): it packs the text and encodes "
        "the prompts, so the numbers compare with a local evaluation."
    )
    api_key_env: str = Field(
        "RAYLM_API_KEY", description="Environment variable holding the API key, on the node that evaluates."
    )
    api_key_file: str | None = Field(
        None, description="A file holding the API key, on the node that evaluates (instead of api_key_env)."
    )
    timeout_s: float = Field(120, gt=0, description="Seconds per request.")

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"an http(s):// URL, e.g. http://127.0.0.1:8000/v1, got {url!r}")
        return url


class EvalModel(Section):
    """One model of the comparison: anything `raylm generate` loads, or a running endpoint."""

    path: str | None = Field(
        None,
        description="A model folder, a raylm run folder (its model, adapter or artifact), a PEFT adapter "
        "folder, a quantized folder (bitsandbytes, GPTQ), a GGUF file, or a storage URI of one.",
    )
    endpoint: EndpointSpec | None = Field(
        None, description="A running OpenAI-compatible server instead of a path."
    )
    name: str | None = Field(None, description="Its label in the table; default: the path's last part.")
    base: str | None = Field(None, description="An adapter's base model, where its record names none.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights' dtype: auto keeps the checkpoint's own."
    )

    @model_validator(mode="after")
    def _one_source(self) -> EvalModel:
        if (self.path is None) == (self.endpoint is None):
            raise ValueError("give either path (a model here) or endpoint (a running server), one of them")
        if self.endpoint is not None and (self.base is not None or self.dtype != "auto"):
            raise ValueError("base and dtype are for a model loaded here: an endpoint's server decides them")
        return self

    @property
    def label(self) -> str:
        if self.endpoint is not None:
            return self.name or self.endpoint.model
        return self.name or PurePosixPath(self.path.rstrip("/")).name


class PerplexityEval(Section):
    """Held-out perplexity: the text packed into blocks as pretraining packs it, each model with its own
    tokenizer."""

    data: DataSpec = Field(description="The text (files, a dataset or a generated corpus) and seq_len.")
    split: Literal["all", "validation", "train"] = Field(
        "all",
        description="Which blocks: all of them (held-out text), or the validation / training split by "
        "data.val_fraction, the blocks a pretraining run on the same data held out / trained on.",
    )
    blocks: int = Field(64, ge=1, description="At most this many blocks, the first ones.")


class TaskEval(Section):
    """A task file scored by exact match of greedy answers (completion, alpaca, chat formats) or by
    accuracy of the most likely choice (choices format)."""

    name: str = Field(description="The task's column in the table.")
    data: SFTDataSpec = Field(description="The examples, in a fine-tuning data format.")
    examples: int = Field(100, ge=1, description="At most this many examples, the first ones.")
    max_new_tokens: int = Field(32, ge=1, description="Greedy answers stop here or at EOS.")


class HarnessEval(Section):
    """lm-evaluation-harness tasks (the `eval` extra: pip install 'raylm[eval]'), run on each model as
    raylm loaded it; task YAMLs of your own over local data files (`dataset_path: json`,
    `dataset_kwargs: {data_files: ...}`) need no hub access."""

    tasks: list[str] = Field(
        min_length=1,
        description="Task or group names: lm-eval's own, or those the YAMLs in include_path define.",
    )
    include_path: str | None = Field(
        None, description="A folder (or file) of task YAMLs to add to lm-eval's own."
    )
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per prompt; default: each task's own."
    )
    limit: int | None = Field(None, ge=1, description="At most this many examples per task.")
    batch_size: int = Field(8, ge=1, description="Requests per forward pass.")
    max_length: int | None = Field(
        None, ge=1, description="Context length lm-eval truncates to; default: the model's own."
    )


class EvaluateResources(Section):
    """What each model's evaluation task gets from the Ray cluster; models run at once where it fits."""

    use_gpu: bool = Field(False, description="Run each model on a GPU worker (one GPU).")
    cpus: float = Field(1, gt=0, description="CPUs reserved per model; also its torch thread count.")


RESERVED = ("model", "loaded", "perplexity", "nll", "ppl_tokens")  # columns of every row of the table


class EvaluateJob(Section):
    """Models, adapters and quantized artifacts side by side on perplexity and tasks."""

    kind: Literal["evaluate"]
    name: str | None = Field(None, description="Job name; default: the output folder's name.")
    models: list[EvalModel] = Field(min_length=1, description="The models, the first the reference.")
    perplexity: PerplexityEval | None = Field(None, description="Held-out perplexity.")
    tasks: list[TaskEval] = Field(default_factory=list, description="Task files scored per model.")
    harness: HarnessEval | None = Field(None, description="lm-evaluation-harness tasks.")
    resources: EvaluateResources = Field(default_factory=EvaluateResources)
    output: OutputSpec

    _models_shorthand = field_validator("models", mode="before")(
        lambda cls, v: [path_shorthand(m) for m in v] if isinstance(v, list) else v
    )
    _output_shorthand = field_validator("output", mode="before")(lambda cls, v: path_shorthand(v))

    @model_validator(mode="after")
    def _something_to_measure(self) -> EvaluateJob:
        if self.perplexity is None and not self.tasks and self.harness is None:
            raise ValueError("nothing to evaluate: give perplexity, tasks, harness, or several")
        labels = [m.label for m in self.models]
        if len(set(labels)) < len(labels):
            twice = sorted({x for x in labels if labels.count(x) > 1})
            raise ValueError(f"models: the label {twice[0]!r} names two models: give each a `name`")
        names = [t.name for t in self.tasks]
        for i, name in enumerate(names):
            if not name.strip() or name in RESERVED:
                raise ValueError(
                    f"tasks.{i}.name: {name!r} is taken by the table's own columns ({', '.join(RESERVED)}): "
                    "choose another"
                )
            if names.index(name) != i:
                raise ValueError(f"tasks.{i}.name: {name!r} names an earlier task too")
        if self.perplexity is not None:
            if self.perplexity.split != "all" and self.perplexity.data.val_fraction == 0:
                raise ValueError(
                    f"perplexity.split: {self.perplexity.split} blocks need perplexity.data.val_fraction > 0 "
                    "(the pretraining run's own), or split: all"
                )
        return self

    @property
    def run_name(self) -> str:
        return self.name or PurePosixPath(self.output.path.rstrip("/")).name or "raylm-evaluate"

    @property
    def cpus_needed(self) -> float:
        """What an embedded local Ray is sized by: every model's task at once."""
        return self.resources.cpus * len(self.models)
