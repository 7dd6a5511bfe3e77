"""Spec round trips, overrides, and every error path, each with its dotted path and a hint."""

import pytest
import yaml

from raylm.kinds import json_schema
from raylm.spec.jobs import PretrainJob
from raylm.spec.loading import load_spec, validate_dict
from raylm.spec.reading import SpecError

pytestmark = pytest.mark.quick

MINIMAL = {
    "kind": "pretrain",
    "model": {"architecture": {"layers": 2, "heads": 2, "hidden": 64, "context": 64}},
    "data": {"generate": {"documents": 50}, "seq_len": 32},
    "output": "runs/x",
}


def write(tmp_path, data, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return path


def problems(tmp_path, data, overrides=()):
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, data), overrides)
    return dict(info.value.problems)


def test_minimal_spec_fills_defaults(tmp_path):
    job = load_spec(write(tmp_path, MINIMAL))
    assert isinstance(job, PretrainJob)
    assert job.output.path == "runs/x" and job.run_name == "x"
    assert job.train.max_steps == 1000 and job.strategy.name == "ddp"
    assert job.model.trust_remote_code is False
    assert job.tokenizer.path is None and job.tokenizer.train is None


def test_round_trip_through_yaml_is_identical(tmp_path):
    job = load_spec(write(tmp_path, MINIMAL))
    dumped = job.model_dump(mode="json")
    again = load_spec(write(tmp_path, yaml.safe_dump(dumped), "again.yaml"))
    assert again == job
    assert again.model_dump(mode="json") == dumped


def test_overrides_set_nested_fields_with_yaml_types(tmp_path):
    job = load_spec(
        write(tmp_path, MINIMAL),
        [
            "train.lr=3e-4",
            "train.batch_size=4",
            "resources.num_workers=2",
            "output=runs/y",
            "train.betas=[0.8, 0.9]",
        ],
    )
    assert job.train.lr == pytest.approx(3e-4)
    assert job.train.batch_size == 4 and job.resources.num_workers == 2
    assert job.output.path == "runs/y" and job.train.betas == (0.8, 0.9)


def test_override_creates_missing_sections(tmp_path):
    job = load_spec(write(tmp_path, MINIMAL), ["failure.max_failures=3"])
    assert job.failure.max_failures == 3


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=1", "output.path.x=1"])
def test_malformed_override_is_reported(tmp_path, bad):
    spec = dict(MINIMAL, output={"path": "runs/x"}) if bad.startswith("output.path") else MINIMAL
    found = problems(tmp_path, spec, [bad])
    assert any(key.startswith("--set") for key in found)


def test_missing_required_field_names_path(tmp_path):
    data = {k: v for k, v in MINIMAL.items() if k != "data"}
    found = problems(tmp_path, data)
    assert "data" in found and "required" in found["data"]


def test_wrong_type_names_path_and_expectation(tmp_path):
    found = problems(tmp_path, MINIMAL, ["train.batch_size=many"])
    assert "train.batch_size" in found
    assert "integer" in found["train.batch_size"] and "Sequences per worker" in found["train.batch_size"]


def test_unknown_field_suggests_the_right_one(tmp_path):
    found = problems(tmp_path, MINIMAL, ["train.lrr=0.1"])
    assert "did you mean 'lr'" in found["train.lrr"]


def test_unknown_kind_lists_choices(tmp_path):
    found = problems(tmp_path, dict(MINIMAL, kind="pretrian"))
    assert "unknown kind" in found["kind"] and "pretrain" in found["kind"]


def test_missing_kind(tmp_path):
    found = problems(tmp_path, {k: v for k, v in MINIMAL.items() if k != "kind"})
    assert "kind" in found


def test_every_problem_is_reported_at_once(tmp_path):
    found = problems(
        tmp_path, MINIMAL, ["train.lr=-1", "train.batch_size=0", "data.seq_len=x", "strategy=zero9"]
    )
    assert {"train.lr", "train.batch_size", "data.seq_len", "strategy"} <= set(found)


def test_cross_field_rules(tmp_path):
    found = problems(tmp_path, MINIMAL, ["data.seq_len=128"])
    assert "context" in " ".join(found.values())
    found = problems(tmp_path, MINIMAL, ["train.precision=fp16"])
    assert "use_gpu" in " ".join(found.values())
    found = problems(tmp_path, MINIMAL, ["model.architecture.hidden=65"])
    assert "divisible" in " ".join(found.values())


def test_model_needs_exactly_one_source(tmp_path):
    found = problems(tmp_path, MINIMAL, ["model.path=some/folder"])
    assert "model" in found and "exactly one" in found["model"]


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, "kind: [pretrain\n"))
    assert "YAML" in str(info.value) and "line" in str(info.value)
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert "no such spec file" in str(info.value)


def test_spec_error_pickles_across_processes():
    import pickle

    err = SpecError([("a.b", "bad")], source="x.yaml")
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == [("a.b", "bad")] and str(again) == str(err)


def test_json_schema_has_descriptions():
    schema = json_schema("pretrain")
    assert schema["properties"]["kind"]["const"] == "pretrain"
    train = schema["$defs"]["TrainSpec"]["properties"]
    assert "Peak learning rate" in train["lr"]["description"]
    assert validate_dict(dict(MINIMAL)).kind == "pretrain"


# ---- finetune: incompatible choices are refused with the reason --------------------------------------


def finetune(**sections):
    spec = {
        "kind": "finetune",
        "model": {"path": "base"},
        "method": "lora",
        "data": {"generate": {}},
        "output": "runs/ft",
    }
    spec.update(sections)
    return spec


@pytest.mark.parametrize(
    "sections,where,words",
    [
        ({"method": "qlora", "strategy": "fsdp"}, "spec", "needs method.optimizer: adamw"),
        ({"method": "qlora", "strategy": {"name": "deepspeed", "stage": 2}}, "spec", "whole 4-bit base"),
        (
            {
                "method": "qlora",
                "strategy": {"name": "deepspeed", "stage": 3},
                "train": {"precision": "bf16"},
            },
            "spec",
            "leave precision fp32",
        ),
        ({"method": "prompt", "strategy": "fsdp"}, "spec", "prompt learning"),
        ({"method": "prefix", "strategy": {"name": "deepspeed", "stage": 3}}, "spec", "ZeRO-3"),
        ({"method": "adapter", "output": {"path": "x", "merge": True}}, "spec", "cannot be merged"),
        ({"method": {"name": "lora", "rank": 8}}, "method.rank", "unknown field"),
        ({"method": "lorra"}, "method", "unknown name 'lorra'"),
        ({"method": {"name": "ia3", "feedforward_modules": ["down_proj"]}}, "method", "needs target_modules"),
        ({"data": {"generate": {}, "format": "sharegpt"}}, "data.format", "completion"),
    ],
)
def test_finetune_refuses_incompatible_choices(sections, where, words):
    with pytest.raises(SpecError) as info:
        validate_dict(finetune(**sections))
    problems = dict(info.value.problems)
    assert words in problems[where], problems


def test_missing_target_modules_are_refused_by_preflight(sft_base):
    from raylm.kinds import preflight as check_job

    job = validate_dict(
        finetune(
            model={"path": str(sft_base)}, method={"name": "lora", "target_modules": ["q_proj", "query"]}
        )
    )
    problems = dict(check_job(job))
    assert (
        "no module named 'query'" in problems["method.target_modules"]
        and "q_proj" in problems["method.target_modules"]
    )


PAIRS = {
    "kind": "finetune",
    "model": {"path": "runs/base/model"},
    "method": {"name": "lora"},
    "data": {"path": "pairs.jsonl", "format": "preference"},
    "output": "runs/dpo",
}


@pytest.mark.parametrize(
    "changes, where, says",
    [
        ({"data": {"path": "sft.jsonl"}, "preference": {}}, "spec", "set data.format: preference"),
        ({"preference": {"objective": "kto"}}, "spec", "objective kto learns from unpaired examples"),
        ({"preference": {"label_smoothing": 0.1}}, "spec", "preference.label_smoothing is robust's"),
        ({"preference": {"gamma": 0.3}}, "spec", "preference.gamma is simpo's setting"),
        ({"preference": {"desirable_weight": 2}}, "spec", "set objective: kto or remove it"),
        ({"preference": {"objective": "orpo", "precompute_reference": True}}, "spec", "no reference model"),
        ({"preference": {"objective": "orpo", "sft_weight": 1}}, "spec", "has its own NLL term"),
        (
            {"data": {"path": "f.jsonl", "format": "kto"}, "preference": {"sft_weight": 1}},
            "spec",
            "preference.sft_weight adds an NLL term to a pairwise loss; kto learns from unpaired",
        ),
        (
            {
                "model": {"architecture": {"layers": 2, "heads": 2, "hidden": 64}},
                "preference": {"precompute_reference": True},
            },
            "spec",
            "set model.path",
        ),
        ({"method": {"name": "lora", "bias": "all"}}, "spec", "set train_norms: false / bias: none"),
        (
            {"data": {"path": "pairs.jsonl", "format": "preference", "loss_on": "all"}},
            "data",
            "remove loss_on",
        ),
    ],
)
def test_preference_specs_that_cannot_run_name_the_field_and_the_fix(tmp_path, changes, where, says):
    found = problems(tmp_path, {**PAIRS, **changes})
    assert where in found and says in found[where], found


def test_preference_defaults_and_searches(tmp_path):
    job = load_spec(write(tmp_path, PAIRS))
    assert job.preference.objective == "dpo" and job.preference.scale == 0.1
    kto = load_spec(write(tmp_path, {**PAIRS, "data": {"path": "f.jsonl", "format": "kto"}}))
    assert kto.preference.objective == "kto"
    assert load_spec(write(tmp_path, {**PAIRS, "preference": {"objective": "simpo"}})).preference.scale == 2.0
    search = {
        "kind": "tune",
        "base": PAIRS,
        "search": {"preference.objective": {"grid": ["dpo", "ipo"]}, "preference.beta": {"grid": [0.1, 0.3]}},
        "metric": "reward_accuracy",
        "output": "runs/search",
    }
    assert load_spec(write(tmp_path, search)).metric == "reward_accuracy"
    assert "do not compare" in problems(tmp_path, {**search, "metric": "val_loss"})["spec"]
    assert "do not compare" in problems(tmp_path, {**search, "metric": "reward_margin"})["spec"]
    # a job written back from a dump (every default spelt out) validates again
    assert load_spec(write(tmp_path, job.model_dump(mode="json"))).preference == job.preference
    sft = {
        **search,
        "base": {**PAIRS, "data": {"path": "sft.jsonl"}},
        "search": {"train.lr": {"grid": [1e-3]}},
    }
    assert "scores preference data" in problems(tmp_path, sft)["spec"]
