"""`kind: pipeline` on real local Ray: a LoRA fine-tune of the session's base, its merged model exported
to GGUF, and the three compared by an evaluation, each stage reading the previous one's artifact. Run
again, nothing runs; a changed stage re-runs with the stages that read from it and nothing else, its
earlier output kept aside; `--only` forces one stage; `raylm lineage` prints the chain behind an
artifact. The evaluation's row for the fine-tuned stage is checked against PEFT loading the stage's
adapter folder directly (the pipeline handed on the right artifact)."""

import json
import os

import pytest
import yaml
from click.testing import CliRunner

from raylm import cli
from raylm.spec.loading import validate_dict
from raylm.submit import run_here
from tests.evaluate.test_evaluate import TEXTS, reference_model, reference_perplexity, write


def chain_spec(root, sft_base, corpus) -> dict:
    return {
        "kind": "pipeline",
        "output": str(root),
        "stages": {
            "sft": {
                "kind": "finetune",
                "model": {"path": str(sft_base)},
                "method": {"name": "lora", "r": 4, "alpha": 8},
                "data": {"generate": {"task": "arithmetic", "examples": 200}, "seq_len": 24},
                "train": {"max_steps": 4, "batch_size": 8, "eval_every": 4, "checkpoint_every": 4},
                "eval": {"exact_match_examples": 0},
                "output": {"merge": True},
            },
            "gguf": {
                "kind": "quantize",
                "model": {"from": "sft", "pick": "merged"},
                "method": {"name": "gguf", "type": "q8_0"},
                "data": {"generate": {"documents": 200}, "seq_len": 16},
                "measure": {"perplexity_blocks": 4, "prompts": 2},
            },
            "eval": {
                "kind": "evaluate",
                "models": [str(sft_base), {"from": "sft"}, {"from": "gguf"}],
                "perplexity": {"data": {"path": str(corpus), "seq_len": 16}},
            },
        },
    }


def stage_summary(root, stage: str) -> dict:
    return json.loads((root / stage / "summary.json").read_text())


@pytest.fixture(scope="module")
def chain(ray_local, sft_base, tmp_path_factory):
    """The pipeline's first run: (its output folder, its spec, its summary)."""
    folder = tmp_path_factory.mktemp("pipeline")
    corpus = folder / "heldout.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    spec = chain_spec(folder / "chain", sft_base, corpus)
    return folder / "chain", spec, run_here(validate_dict(spec))


def test_a_pipeline_chains_artifacts_skips_what_is_done_and_reruns_what_changed(
    chain, sft_base, tmp_path, capsys
):
    from transformers import AutoTokenizer

    root, spec, summary = chain
    spec = json.loads(json.dumps(spec))
    assert [s["ran"] for s in summary["stages"].values()] == [True, True, True]
    # each stage read the artifact of the one before it
    quantized = stage_summary(root, "gguf")
    assert quantized["model"] == str(root / "sft" / "merged")
    rows = {r["model"]: r for r in json.loads((root / "eval" / "results.json").read_text())}
    assert list(rows) == [sft_base.name, "sft", "gguf"]  # a stage's row is named after the stage
    tokenizer = AutoTokenizer.from_pretrained(sft_base)
    adapter = reference_model(sft_base, root / "sft" / "adapter")
    assert rows["sft"]["perplexity"] == pytest.approx(reference_perplexity(adapter, tokenizer, 16), rel=1e-5)
    assert rows["sft"]["perplexity"] != rows[sft_base.name]["perplexity"]
    record = json.loads((root / "lineage.json").read_text())
    assert record["stages"]["gguf"]["parents"] == [{"stage": "sft", "artifact": str(root / "sft" / "merged")}]
    assert record["stages"]["gguf"]["artifact"] == quantized["artifact"]
    assert record["stages"]["sft"]["inputs"] == {"model.path": str(sft_base)}
    assert all(s["status"] == "complete" for s in record["stages"].values())
    assert json.loads((root / "sft" / "lineage.json").read_text())["stages"]["sft"] == record["stages"]["sft"]

    # again: every stage is complete and unchanged, nothing runs
    written = {s: os.stat(root / s / "summary.json").st_mtime_ns for s in ("sft", "gguf", "eval")}
    capsys.readouterr()
    again = run_here(validate_dict(spec))
    assert not any(s["ran"] for s in again["stages"].values())
    assert "stage sft (finetune): skip (unchanged and complete)" in capsys.readouterr().out
    assert {s: os.stat(root / s / "summary.json").st_mtime_ns for s in written} == written

    # the export changes: it and the evaluation that reads it re-run, the fine-tune does not
    spec["stages"]["gguf"]["method"]["type"] = "q4_0"
    changed = run_here(validate_dict(spec))
    assert {n: s["ran"] for n, s in changed["stages"].items()} == {"sft": False, "gguf": True, "eval": True}
    assert os.stat(root / "sft" / "summary.json").st_mtime_ns == written["sft"]
    assert stage_summary(root, "gguf")["artifact"].endswith("q4_0.gguf")
    (aside,) = [p for p in root.iterdir() if p.name.startswith("gguf.superseded-")]
    assert json.loads((aside / "summary.json").read_text())["artifact"] == quantized["artifact"]
    assert (
        rows["gguf"]["perplexity"]
        != json.loads((root / "eval" / "results.json").read_text())[2]["perplexity"]
    )

    # --only: one stage, forced; the CLI prints the plan and the table
    spec_file = tmp_path / "pipeline.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(cli.main, ["run", str(spec_file), "--only", "eval"])
    assert result.exit_code == 0, result.output
    assert "stage eval (evaluate): run (--only)" in result.output
    assert "stage gguf (quantize): skip (--only another stage)" in result.output
    assert "1 stage(s) ran, 2 skipped" in result.output

    # the chain behind the GGUF file
    result = CliRunner().invoke(cli.main, ["lineage", stage_summary(root, "gguf")["artifact"]])
    assert result.exit_code == 0, result.output
    heads = [line.split(" (")[0] for line in result.output.splitlines()[1:] if not line.startswith(" ")]
    assert heads == ["sft", "gguf"]  # the earliest first
    assert f"read      {sft_base} (model.path)" in result.output
    assert f"read      {root / 'sft' / 'merged'} (from sft)" in result.output
    assert "eval (" not in result.output  # what came after it is not its lineage


@pytest.mark.quick
def test_bad_pipelines_name_the_stage_and_field(tmp_path):
    runner = CliRunner()
    sft_base = tmp_path / "base"  # not read: validation without files
    spec = chain_spec(tmp_path / "chain", sft_base, tmp_path / "heldout.jsonl")

    def problems(mutate) -> str:
        broken = json.loads(json.dumps(spec))
        mutate(broken["stages"])
        result = runner.invoke(cli.main, ["validate", "--no-files", write(tmp_path, broken)])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        return result.output

    out = problems(lambda s: s["eval"]["models"][1].update({"from": "stf"}))
    assert "stages.eval.models.1.from: no stage named 'stf' (did you mean 'sft'?)" in out
    out = problems(lambda s: s["gguf"]["model"].pop("pick"))
    assert (
        "stages.gguf.model: stage sft (finetune) produces an adapter; this field takes a model folder" in out
    )
    assert "pick: merged" in out
    out = problems(lambda s: s["sft"]["output"].pop("merge"))
    assert "stages.gguf.model.pick: pick: merged needs output.merge: true in that stage" in out
    out = problems(lambda s: s["sft"].update({"model": {"from": "eval"}}))
    assert "read from each other in a circle" in out and "sft -> eval" in out
    out = problems(lambda s: s["eval"].update({"output": {"from": "sft"}}))
    assert "stages.eval.output: an evaluate stage takes another stage's artifact only at: models.*" in out
    out = problems(lambda s: s.update({"q2": {**s["gguf"], "model": {"from": "eval"}}}))
    assert "stages.q2.model.from: an evaluate stage produces no artifact another stage can read" in out
    out = problems(lambda s: s["sft"]["train"].update({"lr": -1}))
    assert "stages.sft.train.lr" in out
    out = problems(lambda s: s.update({"inner": {"kind": "pipeline", "stages": {}}}))
    assert "stages.inner.kind: a pipeline cannot be a stage" in out
    out = problems(
        lambda s: s.update(
            {
                "s1": {"kind": "serve", "model": {"from": "sft"}},
                "s2": {"kind": "serve", "model": {"from": "sft"}},
            }
        )
    )
    assert "one serve stage per pipeline" in out
    out = problems(
        lambda s: s.update(
            {
                "s1": {
                    "kind": "serve",
                    "model": {"from": "gguf"},
                    "adapters": {"a": {"from": "sft", "name": "x"}},
                }
            }
        )
    )
    assert "stages.s1.adapters.a: this field is a path" in out
    search = {
        "kind": "tune",
        "base": {k: v for k, v in spec["stages"]["sft"].items() if k != "output"},
        "search": {"method.r": {"grid": [4, 8]}},
    }
    final = {"from": "search", "pick": "spec", "train": {"max_steps": 9}, "output": {"merge": True}}
    with_search = {**spec, "stages": {"search": search, "final": final}}
    job = validate_dict(json.loads(json.dumps(with_search)))
    trained = job.job("final")  # the search's base stands in for best.yaml until the search ran
    assert trained.kind == "finetune" and trained.train.max_steps == 9 and trained.output.merge
    assert trained.method.name == "lora" and trained.output.path == str(tmp_path / "chain" / "final")
    with_search["stages"]["final"] = {**final, "pick": "best"}
    result = runner.invoke(cli.main, ["validate", "--no-files", write(tmp_path, with_search)])
    assert result.exit_code == 2 and "stages.final: a whole stage taken from another is" in result.output
    methods = {**search, "search": {"method": {"grid": [{"name": "lora"}, {"name": "prompt"}]}}}
    varied = {**with_search, "stages": {"search": methods, "final": final}}
    result = runner.invoke(cli.main, ["validate", "--no-files", write(tmp_path, varied)])
    assert result.exit_code == 2 and "this search varies `method`" in result.output, result.output
    with_search["stages"]["final"] = {**final, "train": {"lr": -1}}
    result = runner.invoke(cli.main, ["validate", "--no-files", write(tmp_path, with_search)])
    assert result.exit_code == 2 and "stages.final.train.lr" in result.output
    result = runner.invoke(cli.main, ["run", write(tmp_path, spec), "--from", "nope"])
    assert result.exit_code == 2 and "rerun_from: no stage named 'nope'" in result.output
    result = runner.invoke(cli.main, ["run", "jobs/quickstart.yaml", "--only", "x"])
    assert result.exit_code == 2 and "--only: applies to a pipeline spec only" in result.output
    # a stage given as a file is read like an inline one
    stage_file = tmp_path / "eval.yaml"
    stage_file.write_text(yaml.safe_dump({**spec["stages"]["eval"], "models": [str(sft_base)]}))
    spec["stages"]["eval"] = str(stage_file)
    result = runner.invoke(cli.main, ["validate", "--no-files", write(tmp_path, spec)])
    assert result.exit_code == 0, result.output


def test_the_report_of_a_pipeline_opens_in_chromium_with_every_image(chain, chromium):
    """`raylm report` on the pipeline's folder: its page and each stage's page load in headless
    Chromium without a console error or a request beyond the file itself, every image decodes, and the
    text holds the numbers of the stages' summary.json files. `raylm runs` lists the pipeline, its
    stages and their status."""
    from tests.browser import open_page

    root = chain[0]
    result = CliRunner().invoke(cli.main, ["report", str(root)])
    assert result.exit_code == 0 and f"report written to {root}/report.html" in result.output, result.output
    seen = open_page(root / "report.html")
    fetched = [url for url in seen["requests"] if not url.startswith("data:")]  # images are inline
    assert seen["errors"] == [] and fetched == [(root / "report.html").as_uri()]
    assert seen["images"]["total"] >= 1 and seen["images"]["broken"] == 0
    for stage in ("sft", "gguf", "eval"):
        assert (root / stage / "report.html").as_uri() in seen["links"]  # each stage's own report
    for stage, numbers in {
        "sft": lambda s: [f"{s['metrics']['val_loss']:,.4g}", f"{s['parameters']['trainable']:,}"],
        "gguf": lambda s: [f"{s['perplexity']['quantized']:,.4g}", f"{s['weights_bytes']['quantized']:,}"],
        "eval": lambda s: [f"{m['perplexity']:,.4g}" for m in s["models"]],
    }.items():
        page = open_page(root / stage / "report.html")
        assert page["errors"] == [] and page["images"]["broken"] == 0, page["errors"]
        for number in numbers(stage_summary(root, stage)):
            assert number in page["text"], (stage, number)
    assert open_page(root / "sft" / "report.html")["images"]["total"] >= 2  # loss, learning rate ...
    listed = CliRunner().invoke(cli.main, ["runs", str(root.parent)])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[1].split()[:3] == ["chain", "pipeline", "complete"]
    assert any(line.split()[:3] == ["chain/sft", "finetune", "complete"] for line in lines)


@pytest.mark.quick
def test_a_stage_hash_follows_the_files_it_reads(tmp_path):
    """A file a stage reads that no stage wrote (here the evaluation's corpus) is part of its hash:
    rewritten, the stage counts as changed; the stages that do not read it do not."""
    import time

    from raylm.pipeline.driver import stage_hash

    corpus = tmp_path / "heldout.jsonl"
    corpus.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    job = validate_dict(chain_spec(tmp_path / "chain", base, corpus))
    before = {n: stage_hash(job, n) for n in job.order}
    time.sleep(0.01)
    corpus.write_text(json.dumps({"text": TEXTS[1]}) + "\n")
    after = {n: stage_hash(job, n) for n in job.order}
    assert (
        after["eval"] != before["eval"] and after["sft"] == before["sft"] and after["gguf"] == before["gguf"]
    )
    (base / "config.json").write_text('{"changed": true}')  # the external base model, under sft and eval
    again = {n: stage_hash(job, n) for n in job.order}
    assert again["sft"] != after["sft"] and again["eval"] != after["eval"]


@pytest.mark.quick
def test_what_a_hostile_or_second_caller_meets(tmp_path):
    """Overlapping stage outputs and --from with --only are refused; a second run of a pipeline that is
    running is refused (a lock whose process is gone is taken over); `raylm lineage` finds an artifact of
    a pipeline folder moved since it ran, and ignores a lineage.json edited into another shape;
    `raylm runs` lists a folder of broken records without a traceback."""
    from raylm.pipeline.driver import LOCK, held
    from raylm.spec.reading import SpecError

    runner = CliRunner()
    spec = chain_spec(tmp_path / "chain", tmp_path / "base", tmp_path / "heldout.jsonl")
    spec["stages"]["gguf"]["output"] = str(tmp_path / "chain" / "sft" / "gguf")
    result = runner.invoke(cli.main, ["validate", "--no-files", write(tmp_path, spec)])
    assert (
        result.exit_code == 2
        and "stages.gguf.output" in result.output
        and "inside the output of stage sft" in result.output
    )
    spec["stages"]["gguf"].pop("output")
    result = runner.invoke(cli.main, ["run", write(tmp_path, spec), "--from", "sft", "--only", "eval"])
    assert result.exit_code == 2 and "--from and --only exclude each other" in result.output

    root = tmp_path / "locked"
    root.mkdir()
    (root / LOCK).write_text(json.dumps({"pid": os.getppid(), "host": __import__("socket").gethostname()}))
    with pytest.raises(SpecError, match="another raylm run"):
        with held(str(root)):
            pass
    (root / LOCK).write_text(json.dumps({"pid": 2**22 + 12345, "host": __import__("socket").gethostname()}))
    with held(str(root)):  # its process is gone: taken over, and released after
        assert json.loads((root / LOCK).read_text())["pid"] == os.getpid()
    assert not (root / LOCK).exists()

    old, new = "/gone/chain", tmp_path / "moved"
    (new / "sft" / "adapter").mkdir(parents=True)
    stage = {"kind": "finetune", "hash": "ab" * 32, "status": "complete", "output": f"{old}/sft"}
    stage |= {"artifact": f"{old}/sft/adapter", "artifact_type": "adapter", "parents": [], "inputs": {}}
    (new / "lineage.json").write_text(
        json.dumps({"pipeline": "chain", "output": old, "stages": {"sft": stage}})
    )
    result = runner.invoke(cli.main, ["lineage", str(new / "sft" / "adapter")])
    assert result.exit_code == 0 and f"artifact  {new}/sft/adapter (adapter)" in result.output, result.output
    result = runner.invoke(cli.main, ["lineage", str(new)])  # the pipeline itself: every stage
    assert result.exit_code == 0 and "sft (finetune" in result.output
    (new / "lineage.json").write_text(json.dumps({"pipeline": "chain", "stages": []}))
    result = runner.invoke(cli.main, ["lineage", str(new / "sft" / "adapter")])
    assert result.exit_code == 2 and "no pipeline's lineage.json names it" in result.output

    broken = tmp_path / "runs"
    for name, files in {
        "a": {"summary.json": "[]"},
        "b": {"summary.json": json.dumps({"kind": "quantize", "perplexity": 5})},
        "c": {"spec.yaml": "kind: [1]\n"},
        "d": {"lineage.json": json.dumps({"stages": {"x": {"output": 5}}})},
        "e": {"metrics.jsonl": "[1, 2]\n", "spec.yaml": "kind: pretrain\n"},
    }.items():
        (broken / name).mkdir(parents=True)
        for file, text in files.items():
            (broken / name / file).write_text(text)
    result = runner.invoke(cli.main, ["runs", str(broken)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "unreadable" in result.output
    result = runner.invoke(cli.main, ["runs", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no such folder" in result.output
    result = runner.invoke(cli.main, ["report", str(broken / "b")])
    assert result.exit_code == 2 and "not what raylm wrote" in result.output, result.output
