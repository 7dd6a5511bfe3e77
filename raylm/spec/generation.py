"""Generation controls: one definition for everything raylm generates with (`raylm generate`, and the
server and evaluation as they come).

    max_new_tokens: 64
    temperature: 0          # 0: greedy; above 0: sampling, with top_k / top_p / min_p
    num_beams: 1            # beam search when above 1 (length_penalty)
    stop: ["\\n\\n"]          # the text ends before the first stop sequence
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raylm.spec.sections import Section


class GenerationSpec(Section):
    """Greedy decoding, sampling or beam search, with limits, stops and a seed."""

    max_new_tokens: int = Field(64, ge=1, le=1_000_000, description="Tokens generated at most per choice.")
    temperature: float = Field(
        0.0,
        ge=0,
        le=100,
        description="0: greedy (the most likely token); above 0: sample at this temperature.",
    )
    top_k: int | None = Field(None, ge=1, description="Sample among the k most likely tokens only.")
    top_p: float | None = Field(
        None, gt=0, le=1, description="Sample among the most likely tokens whose probabilities sum to p."
    )
    min_p: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Drop tokens less likely than min_p x the most likely one's probability.",
    )
    repetition_penalty: float = Field(
        1.0, gt=0, le=10, description="Divide the logits of tokens already in the text by this (1: off)."
    )
    stop: list[str] = Field(
        default_factory=list, max_length=8, description="Stop sequences: the text ends before the first one."
    )
    seed: int | None = Field(None, ge=0, description="Seed of the sampling (the same seed, the same text).")
    n: int = Field(1, ge=1, le=64, description="Choices per prompt.")
    num_beams: int = Field(1, ge=1, le=64, description="Beam search with this many beams (1: off).")
    length_penalty: float = Field(
        1.0,
        ge=-10,
        le=10,
        description="Beam search: scores divided by length^length_penalty (>1 favours long).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> GenerationSpec:
        given = [k for k in ("top_k", "top_p", "min_p") if getattr(self, k) is not None]
        if given and not self.sampling:
            raise ValueError(
                f"{', '.join(given)} shape sampling, but temperature 0 is greedy: set temperature > 0 "
                "(e.g. 0.7) or leave them out"
            )
        if any(s == "" for s in self.stop):
            raise ValueError("stop: an empty stop sequence would end every text at once: remove it")
        if self.n > 1 and not self.sampling and self.n > self.num_beams:
            raise ValueError(
                f"n={self.n} greedy choices would all be the same text: sample (temperature > 0) or use "
                f"beam search with num_beams >= n"
            )
        if self.length_penalty != 1.0 and self.num_beams == 1:
            raise ValueError("length_penalty scores beams: set num_beams > 1 or leave it out")
        return self

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


class StrategySpec(Section):
    """A prompting strategy around generation: few-shot, chain-of-thought, program-aided (PAL) or ReAct.

    Exemplars are a JSON-lines file: {"question", "answer"} for fewshot; plus "reasoning" for cot;
    {"question", "program"} for pal; {"question", "trace"} (Thought / Action / Observation lines ending
    in "Final Answer: ...") for react.
    """

    name: Literal["fewshot", "cot", "pal", "react"] = Field(
        description="fewshot: exemplars then the question; cot: exemplars with reasoning, the answer "
        "extracted from 'The answer is ...'; pal: the model writes Python, run in a sandbox; react: "
        "Thought / Action / Observation steps with tools."
    )
    exemplars: str | None = Field(
        None,
        description="JSON-lines file of worked examples (required by fewshot; cot without it is zero-shot).",
    )
    documents: str | None = Field(
        None,
        description="react: a folder of .txt / .md files for the search tool (no search tool without it).",
    )
    max_steps: int = Field(8, ge=1, le=64, description="react: Thought/Action rounds at most.")
    timeout_s: float = Field(5.0, gt=0, le=600, description="pal: wall-clock limit of the program.")
    memory_mb: int = Field(256, ge=32, le=65536, description="pal: address-space limit of the program.")
    sandbox: Literal["kernel", "unconfined"] = Field(
        "kernel",
        description="pal: kernel (Landlock + seccomp confine the program; refused where the kernel has "
        "neither) or unconfined (rlimits and bounded output only: any file, socket or process the "
        "server's user can reach is reachable; for trusted models on trusted input only).",
    )

    @model_validator(mode="after")
    def _needs(self) -> StrategySpec:
        if self.name == "fewshot" and self.exemplars is None:
            raise ValueError("strategy fewshot needs exemplars: a JSON-lines file of {question, answer}")
        if self.sandbox != "kernel" and self.name != "pal":
            raise ValueError("sandbox confines PAL programs: use name: pal, or leave sandbox out")
        if self.documents is not None and self.name != "react":
            raise ValueError("documents feed react's search tool: use name: react, or leave documents out")
        return self
