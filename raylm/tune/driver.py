"""Driver of `kind: tune`: Ray Tune over fine-tuning runs (raylm/tune/trial.py), then the results.

    raylm run jobs/tune-methods.yaml
    raylm run jobs/tune-methods.yaml --set num_samples=4 --set max_concurrent_trials=1

The output (a folder, or a storage URI such as s3://bucket/searches/lora) gets `search/` (Tune's
experiment state), `trials/<id>/` (each trial's fine-tuning run), `trials.parquet` and `trials.csv`,
`best.yaml` (a finetune spec that runs as is), `best/` (the best trial's artifact), `curves.png` and,
last, `summary.json` (a search without it is unfinished). Running the same spec again after an
interruption resumes the search: finished trials are kept, unfinished ones continue from their
checkpoints.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from raylm.spec.reading import SpecError
from raylm.spec.tune import TuneJob, trial_base

TRIAL_DRIVER_CPUS = 0.5  # a trial's own process mostly waits on its workers
STEP_FIELDS = ("train.max_steps", "train.epochs", "train.batch_size", "train.grad_accum", "resources")


class Tune:
    """kind: tune (a raylm.kinds.JobKind)."""

    def preflight(self, job: TuneJob) -> list[tuple[str, str]]:
        from raylm.runtime.storage import localize_inputs
        from raylm.train.finetune import Finetune

        # Checked on this node's copies of inputs in object storage; the trials keep the URIs (each
        # trial's workers fetch their own copies on their nodes).
        base = job.base.model_copy(deep=True)
        base.output.path = f"{job.output.path.rstrip('/')}/trials"  # where the trials write
        problems = localize_inputs(base) or Finetune().preflight(base)
        return [(f"base.{where}", what) for where, what in problems]

    def run(self, job: TuneJob) -> dict:
        return run_search(job)


def run_search(job: TuneJob) -> dict:
    import time

    from ray import tune

    from raylm.runtime import storage
    from raylm.runtime.capacity import check_cluster
    from raylm.spec.loading import validate_dict
    from raylm.spec.space import has_grid, parse
    from raylm.train.finetune import prepare_data
    from raylm.train.runs import check_same_run, planned_steps
    from raylm.tune import results
    from raylm.tune.trial import run_trial

    started = time.time()
    output = job.output.path.rstrip("/")  # a folder, or a storage URI (Tune's state and the trials there)
    if not storage.is_uri(output):
        output = str(Path(output).expanduser().resolve())
        Path(output).mkdir(parents=True, exist_ok=True)
    # the trials write under the output
    check_cluster(output, job.base.resources, "training workers of one trial", "base.resources")
    check_same_run(job, output)
    # the search is unfinished from here on (its results are rewritten): a reader of the output must
    # not take the last run's summary for this one's, nor its best/ while it is replaced
    storage.remove(output, "summary.json")
    space = parse(job.search, job.algorithm)
    base = trial_base(job)
    base["output"]["path"] = f"{output}/trials"
    base["data"].setdefault("cache", f"{output}/data-cache")  # one tokenized copy for every trial
    base["failure"] = {"max_failures": 0}  # Tune retries a failed trial (failure.max_failures)
    if job.metric == "exact_match":
        base["eval"] = {**base.get("eval", {}), "during_training": True}
    # Tokenize once here, so that trials whose data settings are not searched start training at once
    # and no Ray Data task competes with running trials for CPUs.
    base_job = validate_dict(base, source="base")
    storage.localize_inputs(base_job)  # its tokenizer, from this node's copy (checked at preflight)
    _, _, _, splits = prepare_data(base_job)
    steps = planned_steps(base_job, splits["train"]["rows"])
    searched = list(job.search)
    concurrent = trials_at_once(job, reserve_cpu=any(p.startswith(("data.", "tokenizer.")) for p in searched))
    payload = {
        "base": base,
        "space": space,
        "metric": job.metric,
        "output": output,
        "name": job.run_name,
        "cwd": os.getcwd(),
        "worker_memory": per_worker_memory(job, concurrent),
    }
    eval_every = base_job.train.eval_every
    step_varies = any(p == f or p.startswith(f + ".") for p in searched for f in STEP_FIELDS)
    print(
        f"[raylm] tune {job.run_name}: {job.samples} {'pass(es) over the grid' if has_grid(space) else 'sample(s)'} of {', '.join(searched)} by {job.algorithm}, "
        f"{concurrent} trial(s) at once, {job.metric} ({job.better}) at every {eval_every} steps, "
        f"scheduler {job.scheduler.name}, output {output}",
        flush=True,
    )
    # A rejected trial reports nothing (it never trained); Tune would call its empty result an error.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, search=payload), {"CPU": TRIAL_DRIVER_CPUS}
    )
    param_space = space.tune_params() if job.algorithm != "optuna" else {}
    experiment = f"{output}/search"
    if tune.Tuner.can_restore(experiment):
        print(f"[raylm] resuming the search in {experiment}: finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(
            experiment,
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
            param_space=param_space,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=job.metric,
                mode=job.better,
                num_samples=job.samples,
                # Tune applies max_concurrent_trials to a Searcher (optuna) only
                max_concurrent_trials=concurrent if job.algorithm == "optuna" else None,
                search_alg=search_algorithm(job, space, concurrent),
                scheduler=scheduler(job, eval_every, None if step_varies else steps),
                reuse_actors=reuses_trial_processes(job),
            ),
            run_config=tune.RunConfig(
                name="search",
                storage_path=output,
                failure_config=tune.FailureConfig(max_failures=job.failure.max_failures),
                verbose=0,  # raylm prints a line per trial and the table at the end
            ),
        )
    grid = tuner.fit()
    rows = results.trial_rows(grid, output, space, job.metric, job.better, steps if not step_varies else None)
    return results.write(job, output, rows, space, steps, time.time() - started)


def search_algorithm(job: TuneJob, space, concurrent: int):
    if job.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(space=space.define_by_run, metric=job.metric, mode=job.better, seed=job.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=job.seed, max_concurrent=concurrent)


def scheduler(job: TuneJob, eval_every: int, steps: int | None):
    """Tune's scheduler. Its time is the training step (every trial reports at the same steps: its
    evaluations); the grace period counts evaluations."""
    spec = job.scheduler
    grace = spec.grace_period * eval_every
    if spec.name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(
            time_attr="step",
            max_t=max(steps or 2**31, grace),
            grace_period=grace,
            reduction_factor=spec.reduction_factor,
            stop_last_trials=False,  # a trial that ran every step finishes (and writes its artifact)
        )
    if spec.name == "median":
        from ray.tune.schedulers import MedianStoppingRule

        return MedianStoppingRule(time_attr="step", grace_period=grace, min_samples_required=2)
    return None


def reuses_trial_processes(job: TuneJob) -> bool:
    """Whether a finished trial's process runs the next trial. A trial's process imports torch,
    transformers and PEFT (its memory check builds the model on the meta device) before it does
    anything: seconds a trial, and most of a rejected or already finished one. Only where no scheduler
    stops trials: Tune keeps a stopped trial's process for reuse without ending the function still
    running in it, so a stopped trial's fit would go on training and holding its workers, and the next
    trial given that process would fail (its reset waits 2 s for the function to end)."""
    return job.scheduler.name == "none"


def trials_at_once(job: TuneJob, reserve_cpu: bool) -> int:
    """Trials the cluster runs at once: each needs its process (TRIAL_DRIVER_CPUS) and its workers;
    a CPU stays free for the data pipeline when trials tokenize data of their own (searched data
    settings). Never more than `max_concurrent_trials`, never so many that trials wait on each other's
    workers forever."""
    import ray

    resources = job.base.resources
    workers = resources.max_workers
    need = {"CPU": TRIAL_DRIVER_CPUS + workers * resources.cpus_per_worker}
    if resources.use_gpu:
        need["GPU"] = workers * resources.gpus_per_worker
    total = ray.cluster_resources()
    room = {name: total.get(name, 0.0) - (1.0 if name == "CPU" and reserve_cpu else 0.0) for name in need}
    fits = min(math.floor(room[name] / amount + 1e-9) for name, amount in need.items())
    if fits < 1:
        have = ", ".join(f"{total.get(n, 0):g} {n}" for n in need)
        wants = ", ".join(f"{v:g} {n}" for n, v in need.items())
        raise SpecError(
            [
                (
                    "base.resources",
                    f"one trial needs {wants} (its process and {workers} worker(s)) "
                    f"{'plus a CPU for the data pipeline ' if reserve_cpu else ''}and the cluster has {have}: "
                    "lower base.resources.num_workers or cpus_per_worker, or add nodes",
                )
            ]
        )
    wanted = job.max_concurrent_trials or fits
    if wanted > fits:
        print(
            f"[raylm] max_concurrent_trials {wanted} lowered to {fits}: the cluster holds {fits} trial(s) "
            f"of {', '.join(f'{v:g} {n}' for n, v in need.items())} at once",
            flush=True,
        )
    return min(wanted, fits)


def per_worker_memory(job: TuneJob, concurrent: int) -> float:
    """Memory of one training worker of a trial, for the estimate check: the spec's figure, a GPU's,
    or the cluster's memory shared by every worker of the trials running at once."""
    import ray

    from raylm.planning.plan import worker_memory

    if getattr(job.base.strategy, "memory_per_worker_gb", None) is not None or job.base.resources.use_gpu:
        return worker_memory(job.base)
    return ray.cluster_resources().get("memory", 0) / (job.base.resources.max_workers * concurrent)
