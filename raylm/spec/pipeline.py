"""The `kind: pipeline` spec: named stages, each an inline spec of any kind (or the path of one), run in
dependency order; a stage takes an earlier stage's artifact with `{from: STAGE}` where a path goes.

```yaml
kind: pipeline
output: runs/chain                      # each stage writes to runs/chain/<stage> unless it says otherwise
stages:
  base: {kind: pretrain, ...}
  sft: {kind: finetune, model: {from: base}, method: {name: lora}, ...}
  search: {kind: tune, base: {kind: finetune, model: {from: base}, ...}, ...}
  nf4: {kind: quantize, model: {from: search, pick: merged}, method: {name: bnb_4bit}}
  eval: {kind: evaluate, models: [{from: base}, {from: search, name: lora}, {from: nf4}], ...}
  serve: {kind: serve, model: {from: search}}
```

Validation resolves every reference before anything runs; `validate_stages` needs the validator of
every kind, which raylm.spec.loading passes in (this module cannot import it: loading lists this kind).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator

from raylm.spec.reading import Problems, SpecError, deep_merge, read_yaml
from raylm.spec.sections import OutputSpec, Section, path_shorthand

# What a stage can hand on, by type: a full-precision Hugging Face model folder, an adapter folder
# (over its recorded base), a quantized model folder (bitsandbytes, GPTQ), a GGUF file's folder.
MODEL, ADAPTER, QUANTIZED, GGUF = "model folder", "adapter", "quantized model", "GGUF file"
LOADABLE = {MODEL, ADAPTER, QUANTIZED, GGUF}  # what `raylm generate` (and so evaluate, serve) loads

# Where a reference may stand, per kind: a dotted location ("*": any list index or mapping key) ->
# (the artifact types it takes, and whether the field is a section with a `path` or a plain path).
SECTION, PATH = "section", "path"
TRAINING_INPUTS = {("model",): ({MODEL}, SECTION), ("tokenizer",): ({MODEL, ADAPTER}, SECTION)}
ACCEPTS: dict[str, dict[tuple[str, ...], tuple[set[str], str]]] = {
    "pretrain": TRAINING_INPUTS,
    "finetune": TRAINING_INPUTS,
    "distill": {**TRAINING_INPUTS, ("teacher",): ({MODEL}, SECTION)},
    "tune": {("base", "model"): ({MODEL}, SECTION), ("base", "tokenizer"): ({MODEL, ADAPTER}, SECTION)},
    "quantize": {("model",): ({MODEL}, SECTION)},
    "prune": {("model",): ({MODEL}, SECTION)},
    "evaluate": {("models", "*"): (LOADABLE, SECTION), ("models", "*", "base"): ({MODEL}, PATH)},
    "serve": {
        ("model",): (LOADABLE, SECTION),
        ("model", "base"): ({MODEL}, PATH),
        ("adapters", "*"): ({ADAPTER}, PATH),
    },
}
PICKS = {"tune": ("best", "merged", "spec"), "finetune": ("artifact", "merged")}
SPEC = "spec"  # a search's best.yaml: a whole fine-tuning stage's settings, no field's path
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Reference:
    """`{from: stage, pick: ...}` at `location` (a dotted path inside the referring stage's spec)."""

    location: tuple[str, ...]
    stage: str
    pick: str | None


@dataclass(frozen=True)
class Artifact:
    path: str
    type: str


class PipelineJob(Section):
    """Stages of any kind run in dependency order on one Ray; a stage names an earlier stage's artifact
    with `{from: STAGE}` (a tune stage's: its best trial's, `pick: merged` for it merged into its base;
    a fine-tuning stage's: its adapter or model, `pick: merged` for merged/). A re-run skips every stage
    whose resolved spec and inputs are unchanged and whose output is complete."""

    kind: Literal["pipeline"]
    name: str | None = Field(None, description="Pipeline name; default: the output folder's name.")
    stages: dict[str, dict] = Field(
        min_length=1,
        description="Stage name -> its spec (inline, or the path of a spec file); a stage without "
        "`output` writes to <output>/<stage name>.",
    )
    output: OutputSpec
    rerun_from: str | None = Field(
        None, description="Re-run this stage and every stage that reads from it (CLI: --from)."
    )
    only: str | None = Field(
        None, description="Run this stage alone (its inputs must be complete), even when it is (CLI: --only)."
    )

    _output_shorthand = field_validator("output", mode="before")(lambda cls, v: path_shorthand(v))
    _jobs: dict = PrivateAttr(default_factory=dict)  # stage -> its validated spec, references resolved
    _order: list = PrivateAttr(default_factory=list)  # stage names, dependencies first
    _references: dict = PrivateAttr(default_factory=dict)  # stage -> [Reference]
    _resolved: dict = PrivateAttr(default_factory=dict)  # stage -> its spec mapping, references resolved

    @field_validator("stages", mode="before")
    @classmethod
    def _read_files(cls, stages: Any) -> Any:
        """A stage given as a path reads the file."""
        if not isinstance(stages, dict):
            return stages
        read = {}
        for name, stage in stages.items():
            if isinstance(stage, str):
                try:
                    stage = read_yaml(stage)
                except SpecError as err:
                    raise ValueError(f"stage {name}: {err.problems[0][1]}") from None
            read[name] = stage
        return read

    @property
    def run_name(self) -> str:
        return self.name or PurePosixPath(self.output.path.rstrip("/")).name or "raylm-pipeline"

    @property
    def order(self) -> list[str]:
        return list(self._order)

    def job(self, stage: str):
        return self._jobs[stage]

    def resolved(self, stage: str) -> dict:
        return self._resolved[stage]

    def references(self, stage: str) -> list[Reference]:
        return list(self._references[stage])

    def parents(self, stage: str) -> list[str]:
        return sorted({r.stage for r in self._references[stage]})

    def artifact(self, stage: str, pick: str | None = None) -> Artifact:
        return produces(self._jobs[stage], pick)

    def dependants(self, stage: str) -> list[str]:
        """The stages that read from `stage`, directly or not, in run order."""
        found = {stage}
        for name in self._order:
            if any(p in found for p in self.parents(name)):
                found.add(name)
        return [n for n in self._order if n in found and n != stage]

    @property
    def cpus_needed(self) -> float:
        """An embedded local Ray is sized by the largest stage (stages run one at a time)."""

        def needs(job) -> float:
            if hasattr(job, "cpus_needed"):
                return job.cpus_needed
            resources = getattr(job, "resources", None)
            return (
                resources.max_workers * resources.cpus_per_worker if hasattr(resources, "max_workers") else 1
            )

        return max((needs(j) for j in self._jobs.values()), default=1)


def validate_stages(job: PipelineJob, validate: Callable[[dict, str], Any]) -> PipelineJob:
    """Resolve every reference and validate every stage (with `validate(mapping, source)`, which raises
    SpecError); raises one SpecError with every problem, each under `stages.<name>`."""
    problems: Problems = []
    root = job.output.path.rstrip("/")
    kinds = {}
    for name, stage in job.stages.items():
        if not STAGE_NAME.match(name):
            problems.append(
                (f"stages.{name}", "a stage name is letters, digits, - and _ (it names a folder)")
            )
        kind = stage.get("kind")
        if kind == "pipeline":
            problems.append((f"stages.{name}.kind", "a pipeline cannot be a stage: list its stages here"))
        # a stage of no known kind: its references are not checked, its own validation names the kind
        kinds[name] = kind if isinstance(kind, str) and kind in ACCEPTS else None
        if "from" in stage and kind is None:  # a whole stage from a search: a fine-tuning job
            kinds[name] = "finetune"
    references = {name: list(_find_references(stage)) for name, stage in job.stages.items()}
    for name, found in references.items():
        for ref in found:
            where = ".".join(("stages", name, *ref.location))
            if not isinstance(ref.stage, str) or not (ref.pick is None or isinstance(ref.pick, str)):
                problems.append((where, "a reference is {from: STAGE} or {from: STAGE, pick: NAME}"))
            elif ref.stage not in job.stages:
                close = difflib.get_close_matches(str(ref.stage), list(job.stages), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(
                    (f"{where}.from", f"no stage named {ref.stage!r}{hint}; stages: {', '.join(job.stages)}")
                )
            elif ref.stage == name:
                problems.append((f"{where}.from", "a stage cannot read its own artifact"))
    if problems:
        raise SpecError(problems)
    order, cycle = _dependency_order({n: sorted({r.stage for r in refs}) for n, refs in references.items()})
    if cycle:
        raise SpecError(
            [(f"stages.{cycle[0]}", f"the stages read from each other in a circle: {' -> '.join(cycle)}")]
        )
    serving = [n for n in order if kinds[n] == "serve"]
    if len(serving) > 1:
        problems.append((f"stages.{serving[1]}", f"one serve stage per pipeline (also {serving[0]})"))
    jobs: dict[str, Any] = {}
    resolved: dict[str, dict] = {}
    for name in order:
        stage = with_output(job.stages[name], kinds[name], root, name)
        failed = False
        for ref in references[name] if kinds[name] is not None else []:
            where = ".".join(("stages", name, *ref.location))
            if ref.stage not in jobs:  # its producer failed validation: reported there
                failed = True
                continue
            if ref.location == ():  # the whole stage: a search's best spec and this stage's changes
                try:
                    stage = best_spec_stage(stage, jobs[ref.stage])
                except ValueError as err:
                    problems.append((f"stages.{name}", str(err)))
                    failed = True
                continue
            accepted = _accepted(kinds[name], ref.location)
            if accepted is None:
                fields = ", ".join(".".join(loc) for loc in ACCEPTS.get(kinds[name], {})) or "none"
                problems.append(
                    (where, f"{_a(kinds[name])} stage takes another stage's artifact only at: {fields}")
                )
                failed = True
                continue
            try:
                artifact = produces(jobs[ref.stage], ref.pick)
            except ValueError as err:
                problems.append((f"{where}.pick" if ref.pick else f"{where}.from", str(err)))
                failed = True
                continue
            types, shape = accepted
            extra = sorted(k for k in _at(stage, ref.location) if k not in ("from", "pick"))
            if shape == PATH and extra:
                problems.append(
                    (
                        where,
                        f"this field is a path: a reference here takes only from and pick, not {', '.join(extra)}",
                    )
                )
                failed = True
                continue
            if artifact.type not in types:
                problems.append((where, _wrong_type(ref, jobs[ref.stage], artifact, types)))
                failed = True
                continue
            stage = _substitute(stage, ref, artifact.path, shape)
            label = ref.stage if ref.pick in (None, "best", "artifact") else f"{ref.stage}-{ref.pick}"
            if kinds[name] == "evaluate" and shape == SECTION and "name" not in _at(stage, ref.location):
                _at(stage, ref.location)["name"] = label  # the table's row: the stage, not a folder name
            if kinds[name] == "serve" and ref.location == ("model",) and "name" not in stage:
                stage["name"] = label  # the served model's name: the stage it came from
        if failed:
            continue
        try:
            jobs[name] = validate(stage, f"stages.{name}")
        except SpecError as err:
            problems += [(f"stages.{name}.{where}".rstrip("."), what) for where, what in err.problems]
            continue
        resolved[name] = stage
    for name in serving[:1]:
        readers = [n for n in order if name in {r.stage for r in references[n]}]
        if order[-1] != name and not readers:
            order = [n for n in order if n != name] + [name]  # serving comes last: it keeps running
    problems += _shared_outputs(job, jobs)
    if job.rerun_from is not None and job.only is not None:
        problems.append(("only", "--from and --only exclude each other: give one"))
    if job.rerun_from is not None and job.rerun_from not in job.stages:
        problems.append(("rerun_from", f"no stage named {job.rerun_from!r}; stages: {', '.join(job.stages)}"))
    if job.only is not None and job.only not in job.stages:
        problems.append(("only", f"no stage named {job.only!r}; stages: {', '.join(job.stages)}"))
    if problems:
        raise SpecError(problems)
    job._jobs, job._order, job._references, job._resolved = jobs, order, references, resolved
    return job


def _shared_outputs(job: PipelineJob, jobs: dict) -> Problems:
    """Stages writing into the same folder, into another stage's folder, or onto the pipeline's own
    files: moving one stage's earlier output aside would take the other's with it."""

    def norm(path: str) -> str:
        if "://" in path:
            return path.rstrip("/")
        from pathlib import Path

        return str(Path(path).expanduser().resolve())

    root = norm(job.output.path)
    outputs = {n: norm(j.output.path) for n, j in jobs.items() if getattr(j, "output", None) is not None}
    problems: Problems = []
    for name, out in outputs.items():
        if out == root or root.startswith(out + "/"):
            problems.append(
                (
                    f"stages.{name}.output",
                    f"{out} holds the pipeline's own files: give the stage a folder of its own",
                )
            )
            continue
        for other, theirs in outputs.items():
            if other != name and (out == theirs or out.startswith(theirs + "/")):
                problems.append(
                    (
                        f"stages.{name}.output",
                        f"{out} is {'the output' if out == theirs else 'inside the output'} of stage {other}: give each stage a folder of its own",
                    )
                )
                break
    return problems


def produces(stage_job, pick: str | None = None) -> Artifact:
    """The artifact a stage's spec writes (known before it runs); ValueError for a pick it has not."""
    kind = stage_job.kind
    picks = PICKS.get(kind, ())
    if pick is not None and pick not in picks:
        offered = f"choose one of: {', '.join(picks)}" if picks else "leave pick out"
        raise ValueError(f"{_a(kind)} stage has no {pick!r} artifact; {offered}")
    out = getattr(getattr(stage_job, "output", None), "path", "").rstrip("/")
    if kind in ("pretrain", "distill"):
        return Artifact(f"{out}/model", MODEL)
    if kind == "prune":
        return Artifact(out, MODEL)
    if kind == "quantize":
        return Artifact(out, GGUF if stage_job.method.name == "gguf" else QUANTIZED)
    if kind == "finetune":
        return _finetuned(stage_job, f"{out}/", pick == "merged")
    if kind == "tune":
        base = stage_job.base
        if pick in ("spec", "merged") and not _one_kind_of_method(stage_job):
            raise ValueError(
                f"pick: {pick} needs the search's method fixed (its base's): this search varies `method`, so "
                "its best trial's kind of artifact is known only after it ran"
            )
        if pick == "spec":
            return Artifact(f"{out}/best.yaml", SPEC)
        if pick == "merged":
            _check_mergeable(base.method.name, "merged into its base by the pipeline")
            return Artifact(f"{out}/best-merged", MODEL)
        return _finetuned(base, f"{out}/best", False, whole=True)
    raise ValueError(f"{_a(kind)} stage produces no artifact another stage can read")


def with_output(stage: dict, kind: str | None, root: str, name: str) -> dict:
    """The stage with its output defaulted: <pipeline output>/<stage name> (also for an output section
    without a path)."""
    stage = dict(stage)
    if kind not in ("serve", None):
        output = stage.get("output")
        if output is None:
            stage["output"] = f"{root}/{name}"
        elif isinstance(output, dict) and "path" not in output:
            stage["output"] = {**output, "path": f"{root}/{name}"}
    return stage


def best_spec_stage(stage: dict, search, best: dict | None = None) -> dict:
    """A stage `{from: SEARCH, pick: spec, <changes>}`: the search's best trial's spec (`best`, its
    best.yaml; before the search ran, its base spec stands in for validation) with the stage's changes
    merged over it; ValueError when the stage is not that."""
    if search.kind != "tune" or stage.get("pick") != "spec":
        raise ValueError(
            "a whole stage taken from another is {from: SEARCH, pick: spec, ...changes}: the best trial's "
            "spec of a tune stage"
        )
    if "kind" in stage:
        raise ValueError("a stage taken from a search's best spec is a finetune stage: leave kind out")
    produces(search, "spec")  # refuses a search that varies the method
    changes = {k: v for k, v in stage.items() if k not in ("from", "pick")}
    if best is None:
        best = search.base.model_dump(mode="json", exclude_none=True)
        best["output"] = {"path": "placeholder"}  # the stage's own, below
    return deep_merge(best, changes)


def _one_kind_of_method(search) -> bool:
    """Whether every method the search may pick writes the base method's kind of artifact and merges
    as it does (a grid over LoRA ranks does; a choice of LoRA or prompt tuning does not)."""
    from raylm.methods import artifact_dir, mergeable

    space = search.search.get("method")
    if space is None:
        return True
    options = (
        next((v for k, v in space.items() if k in ("grid", "choice")), None)
        if isinstance(space, dict)
        else None
    )
    if not isinstance(options, list):
        return False
    base = search.base.method.name
    for option in options:
        name = option.get("name") if isinstance(option, dict) else option
        if not isinstance(name, str) or artifact_dir(name) != artifact_dir(base):
            return False
        if (name in mergeable()) != (base in mergeable()):
            return False
    return True


def _finetuned(job, prefix: str, merged: bool, whole: bool = False) -> Artifact:
    from raylm.methods import artifact_dir

    folder = artifact_dir(job.method.name)
    if merged:
        if not job.output.merge:
            _check_mergeable(job.method.name, "written by this stage")
            raise ValueError("pick: merged needs output.merge: true in that stage")
        return Artifact(f"{prefix}merged", MODEL)
    return Artifact(prefix if whole else f"{prefix}{folder}", MODEL if folder == "model" else ADAPTER)


def _check_mergeable(method: str, how: str) -> None:
    from raylm.methods import mergeable

    if method not in mergeable():
        raise ValueError(
            f"method {method} cannot be merged into its base (mergeable: {', '.join(mergeable())}), so no "
            f"merged model is {how}"
        )


def _wrong_type(ref: Reference, producer, artifact: Artifact, types: set[str]) -> str:
    wanted = " or ".join(sorted(types))
    message = (
        f"stage {ref.stage} ({producer.kind}) produces {_a(artifact.type)}; this field takes {_a(wanted)}"
    )
    if artifact.type == ADAPTER and MODEL in types and producer.kind in PICKS:
        how = "output.merge: true in that stage and " if producer.kind == "finetune" else ""
        message += f": set {how}pick: merged to take the adapter merged into its base"
    return message


def _find_references(data, location: tuple[str, ...] = ()):
    """Every `{from: ...}` mapping in a stage's spec, with its location."""
    if isinstance(data, dict):
        if "from" in data:
            yield Reference(location, data["from"], data.get("pick"))
            return
        for key, value in data.items():
            yield from _find_references(value, (*location, str(key)))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _find_references(value, (*location, str(i)))


def _accepted(kind: str | None, location: tuple[str, ...]):
    for pattern, accepted in ACCEPTS.get(kind, {}).items():
        if len(pattern) == len(location) and all(
            p in ("*", part) for p, part in zip(pattern, location, strict=True)
        ):
            return accepted
    return None


def _at(data, location: tuple[str, ...]):
    for key in location:
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def _substitute(stage: dict, ref: Reference, path: str, shape: str) -> dict:
    """A copy of `stage` with the reference at `ref.location` replaced by the artifact's path."""
    import copy

    stage = copy.deepcopy(stage)
    *parents, last = ref.location
    node = _at(stage, tuple(parents))
    held = _at(stage, ref.location)
    rest = {k: v for k, v in held.items() if k not in ("from", "pick")}
    value = {**rest, "path": path} if shape == SECTION else path
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return stage


def _dependency_order(parents: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(the stages with every stage after the ones it reads, in the spec's order where free), or
    ([], a cycle) when there is one."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> list[str]:
        if state.get(name) == "done":
            return []
        if state.get(name) == "open":
            return [*path[path.index(name) :], name]
        state[name] = "open"
        for parent in parents[name]:
            cycle = visit(parent, [*path, name])
            if cycle:
                return cycle
        state[name] = "done"
        order.append(name)
        return []

    for name in parents:
        cycle = visit(name, [])
        if cycle:
            return [], cycle
    return order, []


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
