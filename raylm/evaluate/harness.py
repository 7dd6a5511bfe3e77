"""lm-evaluation-harness tasks on a model raylm loaded (the `eval` extra), inside a model's Ray task.

    metrics, answers = run_harness(model, tokenizer, job.harness, batch_size)

The model goes to lm-eval as the object raylm loaded (lm-eval's `HFLM(pretrained=model)`), so an adapter,
a bitsandbytes or GPTQ folder and a GGUF file are evaluated exactly as `raylm generate` runs them. A task
YAML's relative `data_files` are read from the folder of `include_path`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CORRECTNESS = ("acc", "exact_match", "acc_norm")  # per-example metrics that say right or wrong


def run_harness(model, tokenizer, spec, endpoint=None) -> tuple[dict, list[dict]]:
    """({"<task>.<metric>[.<filter>]": value}, every example's prompt, answer, reference, verdict); an
    endpoint through lm-eval's own `local-completions` client (token-id prompts, the tokenizer here)."""
    from lm_eval import simple_evaluate

    if endpoint is not None:
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        from raylm.evaluate.endpoint import api_key

        key = api_key(endpoint)
        lm = LocalCompletionsAPI(
            base_url=endpoint.url.rstrip("/") + "/completions",
            model=endpoint.model,
            tokenizer=endpoint.tokenizer,
            tokenizer_backend="huggingface",
            tokenized_requests=True,
            batch_size=1,
            max_length=spec.max_length or 2048,
            timeout=int(endpoint.timeout_s),
            header={"Authorization": f"Bearer {key}"} if key else {},
        )
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(
            pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size, max_length=spec.max_length
        )
    folder = None
    if spec.include_path:
        path = Path(spec.include_path)
        folder = path if path.is_dir() else path.parent
    with _inside(folder):
        manager = task_manager(spec)
        out = simple_evaluate(
            model=lm,
            tasks=list(spec.tasks),
            num_fewshot=spec.num_fewshot,
            limit=spec.limit,
            task_manager=manager,
            log_samples=True,
            bootstrap_iters=0,  # no stderr resampling: one number per metric
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    return metrics(out["results"]), answers(out.get("samples") or {})


def task_manager(spec):
    """lm-eval's task index: the include_path's YAMLs alone when they define every task named (indexing
    lm-eval's thousands of own tasks takes seconds), else with lm-eval's own."""
    from lm_eval.tasks import TaskManager

    if spec.include_path:
        own = TaskManager(include_path=spec.include_path, include_defaults=False)
        if all(name in own.all_tasks for name in spec.tasks):
            return own
    return TaskManager(include_path=spec.include_path)


def metrics(results: dict) -> dict:
    found = {}
    for task, values in results.items():
        for key, value in values.items():
            name, _, filtered = key.partition(",")
            if key in ("alias", "name", "sample_len") or name.endswith("_stderr") or isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                found[f"{task}.{name}" + (f".{filtered}" if filtered not in ("", "none") else "")] = float(
                    value
                )
    return found


def answers(samples: dict) -> list[dict]:
    rows = []
    for task, listed in samples.items():
        for sample in listed:
            arguments = sample.get("arguments") or [[""]]
            prompt = str(arguments[0][0]) if arguments and arguments[0] else ""
            responses = sample.get("filtered_resps") or []
            reference = sample.get("target")
            if responses and isinstance(responses[0], list | tuple):  # log-likelihoods, one per choice
                best = max(range(len(responses)), key=lambda i: responses[i][0])
                answer = str(arguments[best][1]).strip()
                if isinstance(reference, int) and 0 <= reference < len(arguments):
                    reference = str(arguments[reference][1]).strip()
            else:
                answer = str(responses[0]) if responses else ""
            verdict = next((sample[m] for m in CORRECTNESS if m in sample), None)
            rows.append(
                {
                    "task": task,
                    "prompt": prompt,
                    "answer": answer,
                    "reference": str(reference),
                    "correct": None if verdict is None else bool(verdict),
                }
            )
    return rows


@contextlib.contextmanager
def _inside(folder: Path | None):
    if folder is None:
        yield
        return
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)
