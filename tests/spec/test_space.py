"""The search space: parsing, per-method fields, what Ray Tune and Optuna receive, and the spec's
up-front validation of every value a trial could get."""

import pytest
import yaml
from click.testing import CliRunner

from raylm.cli import main
from raylm.spec.loading import validate_dict
from raylm.spec.reading import SpecError
from raylm.spec.space import SpaceError, parse

pytestmark = pytest.mark.quick

SEARCH = {
    "train.lr": {"loguniform": [1.0e-4, 3.0e-2]},
    "method": {
        "choice": [
            {"name": "lora", "r": {"choice": [4, 8]}, "alpha": {"choice": [8, 16]}},
            {"name": "ia3"},
            {"name": "prompt", "num_virtual_tokens": {"randint": [4, 32]}},
        ]
    },
}


def tune_spec(base_folder, search=SEARCH, **fields) -> dict:
    return {
        "kind": "tune",
        "base": {
            "model": {"path": str(base_folder)},
            "method": {"name": "lora"},
            "data": {"generate": {"task": "arithmetic", "examples": 200}, "seq_len": 24},
            "train": {"max_steps": 10},
        },
        "search": search,
        "output": "runs/search",
        **fields,
    }


def test_method_fields_belong_to_their_method():
    space = parse(SEARCH, "random")
    assert [o.label for o in space.methods] == ["lora", "ia3", "prompt"]
    params = space.tune_params()
    assert set(params) == {
        "train.lr",
        "method",
        "method.lora.r",
        "method.lora.alpha",
        "method.prompt.num_virtual_tokens",
    }
    config = {"train.lr": 1e-3, "method": "ia3", "method.lora.r": 8, "method.lora.alpha": 8}
    assert space.overrides(config) == {"train.lr": 1e-3, "method": {"name": "ia3"}}
    config["method"] = "lora"
    assert space.overrides(config)["method"] == {"name": "lora", "r": 8, "alpha": 8}


def test_tune_domains_sample_inside_the_bounds():
    """randint is inclusive at both ends (Tune's own upper bound is exclusive: raylm shifts it)."""
    params = parse(
        {"a": {"randint": [1, 3]}, "b": {"qrandint": [0, 8, 4]}, "c": {"loguniform": [1e-4, 1e-2]}}, "random"
    ).tune_params()
    a = set(params["a"].sample(size=400))
    assert a == {1, 2, 3}
    assert set(params["b"].sample(size=200)) == {0, 4, 8}
    c = params["c"].sample(size=200)
    assert min(c) >= 1e-4 and max(c) <= 1e-2


def test_grid_expands_each_methods_own_grid():
    space = parse(
        {
            "method": {"grid": [{"name": "lora", "r": {"grid": [4, 8]}}, {"name": "ia3"}]},
            "train.lr": {"grid": [0.1]},
        },
        "grid",
    )
    assert [o.label for o in space.methods] == ["lora[r=4]", "lora[r=8]", "ia3"]
    assert space.tune_params()["method"] == {"grid_search": ["lora[r=4]", "lora[r=8]", "ia3"]}
    assert space.overrides({"method": "lora[r=8]", "train.lr": 0.1})["method"] == {"name": "lora", "r": 8}


def test_optuna_suggests_a_methods_fields_only_when_it_is_chosen():
    import optuna

    space = parse(SEARCH, "optuna")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(30):
        trial = study.ask()
        space.define_by_run(trial)
        seen.setdefault(trial.params["method"], set()).update(trial.params)
        study.tell(trial, 0.0)
    assert seen["ia3"] == {"train.lr", "method"}
    assert seen["lora"] == {"train.lr", "method", "method.lora.r", "method.lora.alpha"}
    assert seen["prompt"] == {"train.lr", "method", "method.prompt.num_virtual_tokens"}


@pytest.mark.parametrize(
    ("search", "algorithm", "says"),
    [
        ({}, "random", "expected a mapping"),
        ({"train.lr": 0.1}, "random", "nothing is searched"),
        ({"train.lr": {"unifrom": [0, 1]}}, "random", "unknown distribution 'unifrom'"),
        ({"train.lr": {"loguniform": [0, 1]}}, "random", "low > 0"),
        ({"train.lr": {"uniform": [1, 0]}}, "random", "low < high"),
        ({"train.batch_size": {"randint": [1.5, 4]}}, "random", "integers"),
        ({"train.lr": {"grid": [0.1, 0.2]}}, "optuna", "does not enumerate a grid"),
        ({"train.lr": {"choice": [0.1, 0.2]}}, "grid", "grid values only"),
        ({"method.target_modules": {"choice": [["q_proj"], "all-linear"]}}, "optuna", "numbers, strings"),
        ({"method": {"choice": [{"r": 4}]}}, "random", "needs a name"),
        (
            {"method": {"choice": [{"name": "lora", "r": {"grid": [4, 8]}}]}},
            "random",
            "method itself to be a grid",
        ),
        (
            {"method": {"choice": ["lora", "ia3"]}, "method.r": {"choice": [4]}},
            "random",
            "method is searched too",
        ),
    ],
)
def test_space_problems_are_named(search, algorithm, says):
    with pytest.raises(SpaceError) as info:
        parse(search, algorithm)
    assert says in str(info.value)


def test_spec_validates_every_value_a_trial_could_get(sft_base):
    job = validate_dict(tune_spec(sft_base))
    assert job.metric == "val_loss" and job.better == "min"
    assert job.base.output.path == "runs/search/trials"  # trials set their own folders
    bad = {**SEARCH, "method": {"choice": [{"name": "lora", "r": {"choice": [4, 0]}}]}}
    with pytest.raises(SpecError) as info:
        validate_dict(tune_spec(sft_base, bad))
    assert "search.method" in str(info.value) and "method.lora.r" in str(info.value)
    with pytest.raises(SpecError) as info:
        validate_dict(tune_spec(sft_base, {"train.lrr": {"choice": [0.1, 0.2]}}))
    assert "search.train.lrr" in str(info.value)
    # a metric the base cannot report
    with pytest.raises(SpecError) as info:
        validate_dict(tune_spec(sft_base, metric="val_accuracy"))
    assert "choices data" in str(info.value)
    assert validate_dict(tune_spec(sft_base, metric="eval.exact_match")).better == "max"


def test_base_from_a_file_and_cli_validate(sft_base, tmp_path):
    base = tune_spec(sft_base)["base"]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"kind": "finetune", **base, "output": "runs/x"}))
    spec = {**tune_spec(sft_base), "base": str(tmp_path / "base.yaml")}
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "tune.yaml")])
    assert result.exit_code == 0, result.output
    assert "ok (tune)" in result.output
    spec["base"] = str(tmp_path / "missing.yaml")
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "tune.yaml")])
    assert result.exit_code == 2 and "no such spec file" in result.output and "Traceback" not in result.output
    pretrain = {"kind": "pretrain", "model": {"path": "x"}, "data": {"path": "x"}, "output": "y"}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(pretrain))
    spec["base"] = str(tmp_path / "base.yaml")
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "tune.yaml")])
    assert result.exit_code == 2 and "runs fine-tuning jobs" in result.output
