"""The memory estimator: the bytes-per-parameter rules, and agreement with measured peak memory of
real training steps on CPU (peak RSS of a fresh process, which also holds allocator slack)."""

import json
import os
import subprocess
import sys

import pytest

from raylm.methods.qlora import QUANT_BITS
from raylm.planning import memory
from raylm.planning.memory import GiB, estimate, shape_from_config, shape_from_params

TOLERANCE = 0.25  # |estimate / measured - 1|
# glibc keeps freed memory of mid-sized blocks in the process; with every block above 64 KiB mmap'ed
# and returned on free, peak RSS follows peak live memory instead of the allocator's history.
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

MEASURE = """
import json, resource, sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig
layers, hidden, inter, vocab, batch, seq, ckpt = (int(a) for a in sys.argv[1:8])
precision, dtype = sys.argv[8:10]
torch.set_num_threads(2)
config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, max_position_embeddings=seq)
ids = torch.randint(0, vocab, (batch, seq))
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()  # resident now
model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
model.config.use_cache = False
autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
if ckpt:
    model.gradient_checkpointing_enable()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
# A training step's peak comes once the optimizer's moments exist (from the first step on). They are
# made here by a zero update, without a first step's cost; then the high-water mark is reset to the
# resident size (Linux: clear_refs 5), so neither the imports nor the model's construction count.
for parameter in model.parameters():
    parameter.grad = torch.zeros_like(parameter)
optimizer.step()
optimizer.zero_grad(set_to_none=True)
with open("/proc/self/clear_refs", "w") as reset:
    reset.write("5")
with autocast:
    loss = model(input_ids=ids, labels=ids).loss
loss.backward()
optimizer.step()
optimizer.zero_grad(set_to_none=True)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak": peak - before}))
"""


def llama(layers, hidden, inter, vocab, seq):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        max_position_embeddings=seq,
    )


@pytest.mark.parametrize(
    "layers,hidden,inter,vocab,batch,seq,ckpt,precision,dtype",
    [
        (8, 512, 1376, 8000, 8, 256, 0, "fp32", "float32"),
        (8, 512, 1376, 8000, 8, 256, 1, "fp32", "float32"),
        (4, 768, 2048, 16000, 4, 512, 0, "fp32", "float32"),
        # bf16: one sequence a step. A CPU without bf16 matrix units multiplies bf16 ~17x slower than
        # fp32 (8 sequences took 4-5 min here). Autocast over fp32 weights:
        (8, 512, 1376, 8000, 1, 256, 0, "bf16", "float32"),
        # weights, gradients, moments in bf16. (Measured with ru_maxrss minus the size after the imports,
        # this case read 574 MiB in two full-suite runs against 371 MiB alone; ru_maxrss is the process's
        # all-time peak, so a peak from before the training would count. The high-water mark is now
        # reset after the imports.)
        (8, 512, 1376, 8000, 1, 256, 0, "bf16", "bfloat16"),
    ],
    ids=["33M", "33M-checkpointing", "53M-long", "33M-bf16-autocast", "33M-bf16-weights"],
)
def test_estimate_matches_measured_peak(layers, hidden, inter, vocab, batch, seq, ckpt, precision, dtype):
    """The unadjusted estimate of what the run allocates, against the measured peak."""
    args = [str(a) for a in (layers, hidden, inter, vocab, batch, seq, ckpt, precision, dtype)]
    # a fresh environment: nothing the test session set (Ray, libraries imported in it) reaches the measurement
    env = {k: os.environ[k] for k in ("PATH", "HOME", "PYTHONPATH") if k in os.environ} | MEASURE_ENV
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, check=True, env=env
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    shape = shape_from_config(llama(layers, hidden, inter, vocab, seq))
    # transformers' default attention (SDPA) runs torch's CPU flash kernel here: no scores are kept
    predicted = estimate(
        shape, "ddp", precision, 1, batch, seq, bool(ckpt), flash_attention=True, dtype=dtype
    ).total
    assert abs(predicted / measured - 1) <= TOLERANCE, (
        f"predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"
    )


@pytest.mark.quick
def test_bytes_per_parameter_rules():
    shape = shape_from_params(1e9)
    fp32 = estimate(shape, "ddp", "fp32", workers=1, batch=1, seq_len=128)
    assert fp32.weights == 4e9 and (fp32.weights + fp32.gradients + fp32.optimizer) / shape.params == 16
    state = lambda b: (b.weights + b.gradients + b.optimizer) / shape.params  # noqa: E731
    mixed = estimate(shape, "ddp", "bf16", workers=1, batch=1, seq_len=128)
    assert mixed.weights == 4e9 and state(mixed) == 16  # autocast stores nothing in bf16
    assert state(estimate(shape, "ddp", "bf16", workers=1, batch=1, seq_len=128, dtype="bfloat16")) == 8
    # DeepSpeed bf16: a 2-byte module and gradient partition, the fp32 master 4 + moments 8; at the step
    # an fp32 copy of the gradient partition (4) and AdamW's two temporaries (8) beside the 2-byte one,
    # which DeepSpeed frees after the last of raylm's two parameter groups has stepped
    zero_bf16 = estimate(shape, "zero1", "bf16", workers=1, batch=1, seq_len=128)
    assert zero_bf16.weights == 2e9 and state(zero_bf16) == 2 + 2 + 12
    assert zero_bf16.gradients + zero_bf16.temporary == 14e9  # a CPU worker's step
    on_gpu = estimate(shape, "zero1", "bf16", workers=1, batch=1, seq_len=128, gpu=True)
    assert on_gpu.temporary == 8e9  # measured on an H200 (foreach AdamW: one temporary)
    fsdp_bf16 = estimate(shape, "fsdp", "bf16", workers=8, batch=1, seq_len=128, dtype="bfloat16")
    assert state(fsdp_bf16) == 16 / 8  # the shards stay fp32: the optimizer's master weights
    n = 8
    z1 = estimate(shape, "zero1", "fp32", workers=n, batch=1, seq_len=128)
    z2 = estimate(shape, "zero2", "fp32", workers=n, batch=1, seq_len=128)
    z3 = estimate(shape, "zero3", "fp32", workers=n, batch=1, seq_len=128)
    # fp32 runs keep the master clone too; ZeRO-1 and -2 keep one gradient partition (DeepSpeed 0.19)
    assert state(z1) == state(z2) == 4 + 16 / n and z2.gradients_persist
    p = shape.params
    assert (z3.gradients, z3.optimizer, z3.temporary) == (4 * p / n, 12 * p / n, 8 * p / n)
    assert z3.weights > 4 * p / n + 4 * p  # plus what it gathered: up to 1e9 live parameters, and the norms
    # the gradient partitions persist beside the activations; the step's temporaries do not
    assert (
        z2.total
        == z2.weights
        + z2.optimizer
        + z2.gradients
        + max(z2.activations, z2.temporary)
        + z2.buckets
        + z2.process
    )
    # buckets: raylm sizes the reduce bucket hidden^2 elements (fp32), DeepSpeed's default is 5e8
    assert z2.buckets == shape.hidden**2 * 4 and z3.buckets == 2 * shape.hidden**2 * 4  # overlap_comm
    big = estimate(shape, "zero2", "fp32", workers=n, batch=1, seq_len=128, zero={"reduce_bucket_size": 5e8})
    assert big.buckets == 5e8 * 4 and big.total - z2.total == pytest.approx(big.buckets - z2.buckets)
    offloaded = estimate(
        shape, "zero2", "fp32", workers=n, batch=1, seq_len=128, offload_optimizer=True, gpu=True
    )
    assert offloaded.optimizer == offloaded.temporary == offloaded.gradients == 0
    assert offloaded.host == pytest.approx((12 + 8 + 4) * p / n)
    # on CPU workers the host is the worker's memory: offloading moves nothing out of the peak. The
    # master, moments and fp32 gradient partitions persist, with a module-dtype copy of the weight
    # partition and two largest-parameter gradient buffers; AdamW's temporaries come at the step only
    on_cpu = estimate(shape, "zero2", "fp32", workers=n, batch=1, seq_len=128, offload_optimizer=True)
    largest = max(shape.vocab, shape.intermediate) * shape.hidden
    assert on_cpu.host == 0 and on_cpu.optimizer == 12 * p / n and on_cpu.temporary == 8 * p / n
    assert on_cpu.gradients == pytest.approx((4 + 4) * p / n + 2 * largest * 4)
    assert on_cpu.total == pytest.approx(
        on_cpu.weights
        + on_cpu.optimizer
        + on_cpu.gradients
        + max(on_cpu.activations, on_cpu.temporary)
        + on_cpu.buckets
        + on_cpu.process
    )


@pytest.mark.quick
def test_a_cpu_worker_counts_its_process_memory_a_gpu_worker_does_not():
    """A CPU worker's peak holds its process's own memory beyond the model (memory.CPU_PROCESS: the
    kernels' code, the math libraries' caches, the data reader, Python objects), whatever the model's
    size; a GPU worker's is host memory, not the device's."""
    small, large = shape_from_params(1e8), shape_from_params(1e9)
    for strategy in memory.STRATEGIES:
        for precision, mixed in (("fp32", False), ("bf16", True)):
            on_cpu = [
                estimate(s, strategy, precision, workers=2, batch=1, seq_len=128) for s in (small, large)
            ]
            # the components measured in BENCHMARKS.md: 53 MiB in fp32, 63 MiB computing in 16 bits
            assert on_cpu[0].process == on_cpu[1].process == (63 if mixed else 53) * 2**20
            gpu = estimate(small, strategy, precision, workers=2, batch=1, seq_len=128, gpu=True)
            assert gpu.process == 0


@pytest.mark.quick
def test_an_explicit_deepspeed_strategys_settings_reach_the_estimate(tmp_path):
    """What a spec sets under strategy.config.zero_optimization (inline or in its JSON file, ZeRO-3's
    settings by either of DeepSpeed's names, offload there or as the strategy's flag) is what the
    estimate counts, and what raylm's config hands DeepSpeed."""
    import json

    from raylm.planning.plan import deepspeed_terms
    from raylm.spec.sections import TrainSpec
    from raylm.spec.strategies import DeepSpeedStrategy
    from raylm.train.strategies.deepspeed import config

    shape = shape_from_params(1e9)
    asked = {"reduce_bucket_size": 5e8, "max_live_parameters": 1e6, "offload_optimizer": {"device": "cpu"}}
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": asked}))
    for strategy in (
        DeepSpeedStrategy(name="deepspeed", stage=3, config={"zero_optimization": asked}),
        DeepSpeedStrategy(name="deepspeed", stage=3, config=str(tmp_path / "ds.json")),
    ):
        terms = deepspeed_terms(strategy)
        assert terms["offload_optimizer"] and terms["zero"]["stage3_max_live_parameters"] == 1e6
        b = estimate(shape, "zero3", "bf16", workers=8, batch=1, seq_len=128, gpu=True, **terms)
        assert b.buckets == 5e8 * 4 * 2 and b.host > 0 and b.optimizer == 0  # overlap_comm: ZeRO-3's default
        default = estimate(shape, "zero3", "bf16", workers=8, batch=1, seq_len=128, gpu=True)
        assert default.weights - b.weights == pytest.approx((shape.params - 1e6) * 2)  # fewer live parameters
    plain = DeepSpeedStrategy(
        name="deepspeed", stage=3, config={"zero_optimization": {"prefetch_bucket_size": 7}}
    )
    written = config(plain, TrainSpec(), "fp32", 64)["zero_optimization"]
    assert written["prefetch_bucket_size"] == 7 and "stage3_prefetch_bucket_size" not in written
    # A frozen base (LoRA-style): only the trainable part carries gradients and optimizer state.
    lora = estimate(shape, "ddp", "fp32", workers=1, batch=1, seq_len=128, trainable=10_000_000)
    assert lora.gradients == 4e7 and lora.optimizer == 8e7 and lora.weights == 4e9


@pytest.mark.quick
def test_one_billion_parameters_rule_of_thumb():
    shape = shape_from_params(1e9)
    assert 2000 <= shape.hidden <= 2300 and 14 <= shape.layers <= 22
    weights = shape.params * 4 / GiB
    assert 3.5 < weights < 4  # "4 GB to store"
    train = estimate(shape, "ddp", "fp32", workers=1, batch=8, seq_len=2048, flash_attention=True).total / GiB
    assert 60 < train < 100  # "~80 GB to train", activations at batch 8 x 2048 included


@pytest.mark.quick
def test_qlora_base_bits_and_lora_trainable_set():
    """QLoRA: NF4 stores 4.5 bits per frozen parameter (4.127 double-quantised); LoRA parameters keep
    their precision and alone carry gradients and Adam state."""
    assert QUANT_BITS["nf4"] == 4.5
    assert QUANT_BITS["nf4-dq"] == pytest.approx(4.127, abs=1e-3)
    shape = memory.shape_from_params(7e9)
    lora = 20_000_000
    b = memory.estimate(shape, "ddp", "bf16", trainable=lora, weight_bits=QUANT_BITS["nf4-dq"])
    frozen = shape.params - lora
    # the LoRA weights stay fp32 (prepare_model_for_kbit_training upcasts them; bf16 is autocast)
    assert b.weights == pytest.approx(frozen * 4.127 / 8 + lora * 4, rel=1e-3)
    assert b.gradients == lora * 4 and b.optimizer == lora * 8
    full = memory.estimate(shape, "ddp", "bf16", dtype="bfloat16")
    assert b.weights < full.weights / 3.8  # 7B: ~3.6 GB of 4-bit weights against 14 GB in bf16


@pytest.mark.quick
def test_a_distillation_teacher_adds_its_weights_and_distributions_to_every_strategy(tmp_path):
    """The teacher is whole on every worker: its parameters (counted by transformers) x 4 bytes in
    float32, and four float32 [batch, seq, vocab] tensors of the loss (its logits, log-softmax and
    probabilities, the student's log-softmax); the same job without a teacher peaks that much lower."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from raylm.planning.plan import _job_terms
    from raylm.spec.loading import validate_dict

    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2
    )
    config.save_pretrained(tmp_path / "teacher")
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    student = {"architecture": {"family": "llama", "layers": 1, "heads": 2, "hidden": 32, "context": 64}}
    spec = {
        "kind": "distill",
        "model": student,
        "teacher": {"path": str(tmp_path / "teacher")},
        "data": {"generate": {"documents": 10}, "seq_len": 64},
        "train": {"batch_size": 4},
        "output": str(tmp_path / "out"),
    }
    distill = _job_terms(validate_dict(spec))
    assert distill["teacher"] == params * 4 + 4 * (4 * 64 * 300) * 4
    alone = {**distill, "teacher": 0.0}
    for key in ("ddp", "zero3", "fsdp"):
        with_teacher = estimate(strategy=key, **{k: v for k, v in distill.items() if k != "elastic"})
        without = estimate(strategy=key, **{k: v for k, v in alone.items() if k != "elastic"})
        assert with_teacher.total - without.total == distill["teacher"]


@pytest.mark.quick
def test_estimate_of_a_qlora_spec_counts_what_auto_counts(tmp_path):
    """`raylm estimate` on a QLoRA spec: only LoRA's parameters (counted here by hand) carry gradients,
    the base is 4-bit, and the strategies the method refuses (ZeRO-1/2: a whole 4-bit base on every
    worker) are marked; with torch AdamW fsdp and ZeRO-3 are allowed."""
    import yaml
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4
    ).save_pretrained(tmp_path / "base")
    spec = {
        "kind": "finetune",
        "model": {"path": str(tmp_path / "base")},
        "method": {"name": "qlora", "r": 16, "optimizer": "adamw"},
        "data": {"generate": {"task": "arithmetic"}},
        "strategy": "fsdp",
        "output": str(tmp_path / "out"),
    }
    (tmp_path / "qlora.yaml").write_text(yaml.safe_dump(spec))
    from click.testing import CliRunner

    from raylm.cli import main

    out = CliRunner().invoke(main, ["estimate", str(tmp_path / "qlora.yaml")])
    assert out.exit_code == 0, out.output
    # r x (in + out) for q, k, v, o (256 -> 256) and gate, up (256 -> 512), down (512 -> 256), 2 layers
    lora = 2 * 16 * (4 * (256 + 256) + 3 * (256 + 512))
    assert f"{lora / 1e6:,.2f}M of them train, the frozen base in 4.13 bits" in out.output
    rows = {
        line.split()[0]: line
        for line in out.output.splitlines()
        if line.split()[:1] in (["ddp"], ["zero1"], ["zero2"], ["zero3"], ["fsdp"])
    }
    assert rows["ddp"].split()[2] == f"{lora * 4 / 2**20:.2f}"  # gradients: the LoRA weights' only
    assert all("cannot run" in rows[k] for k in ("zero1", "zero2"))
    assert not any("cannot run" in rows[k] for k in ("ddp", "zero3", "fsdp"))

    # with bf16 mixed precision DeepSpeed would cast the packed codes: ZeRO-3 is refused too, so
    # strategy: auto cannot pick it
    (tmp_path / "bf16.yaml").write_text(yaml.safe_dump({**spec, "train": {"precision": "bf16"}}))
    out = CliRunner().invoke(main, ["estimate", str(tmp_path / "bf16.yaml")])
    assert out.exit_code == 0, out.output
    marked = [line.split()[0] for line in out.output.splitlines() if "cannot run" in line]
    assert sorted(marked) == ["zero1", "zero2", "zero3"], out.output


@pytest.mark.quick
def test_estimate_answers_for_each_training_stage_of_a_pipeline_and_reads_run_folders(tmp_path):
    """`raylm estimate` on a pipeline: a table for each training stage in order (a pretraining stage from
    its architecture, a finetune whose base is a finished run folder given by its run folder), a stage
    whose model another stage produces says so; a model that cannot be read anywhere fails with exit 2
    after the other stages were estimated."""
    import json

    import yaml
    from click.testing import CliRunner
    from transformers import LlamaConfig

    from raylm.cli import main

    run = tmp_path / "done"  # a finished raylm run folder: its summary names the model it produced
    LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    ).save_pretrained(run / "model")
    (run / "summary.json").write_text(json.dumps({"kind": "pretrain", "model": str(run / "model")}))
    arch = {"family": "llama", "layers": 2, "heads": 2, "hidden": 64, "context": 256}
    finetune = {"method": "lora", "data": {"generate": {"task": "arithmetic"}}}
    stages = {
        "base": {"kind": "pretrain", "model": {"architecture": arch}, "data": {"generate": {}}},
        "sft": {"kind": "finetune", "model": {"from": "base"}, **finetune},
        "other": {"kind": "finetune", "model": {"path": str(run)}, **finetune},
        "gguf": {
            "kind": "quantize",
            "model": {"from": "sft", "pick": "merged"},
            "method": "gguf",
            "data": {"generate": {}},
        },  # fmt: skip
    }
    spec = {"kind": "pipeline", "output": str(tmp_path / "out"), "stages": stages}
    spec["stages"]["sft"]["output"] = {"merge": True}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    out = CliRunner().invoke(main, ["estimate", str(tmp_path / "p.yaml")])
    assert out.exit_code == 0, out.output
    headers = [line for line in out.output.splitlines() if line.startswith("== stage")]
    assert headers == ["== stage base (pretrain)", "== stage sft (finetune)", "== stage other (finetune)"]
    base, sft, other = out.output.split("== stage")[1:]
    assert "2 layers, hidden 64" in base and "ddp" in base
    assert "stage base's output, which does not exist yet" in sft and "ddp " not in sft
    assert "2 layers, hidden 128" in other and "fsdp" in other  # read from the run's model/

    stages["other"]["model"]["path"] = str(tmp_path / "nowhere")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    out = CliRunner().invoke(main, ["estimate", str(tmp_path / "p.yaml")])
    assert out.exit_code == 2 and "== stage other" in out.output
    assert (
        "stage other: 2 problem(s)" in out.output and "nowhere is not a folder on this machine" in out.output
    )
    assert "2 layers, hidden 64" in out.output  # the other stages still estimated
    assert CliRunner().invoke(main, ["estimate", str(tmp_path / "p.yaml"), "--params", "1e9"]).exit_code == 2

    stages["other"] = {"kind": "distill", "teacher": {"from": "base"}, "model": {"architecture": arch},
                       "data": {"generate": {}}}  # fmt: skip
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    out = CliRunner().invoke(main, ["estimate", str(tmp_path / "p.yaml")])
    assert out.exit_code == 0, out.output
    assert "== stage other (distill)\n[raylm] its model is stage base's output" in out.output


@pytest.mark.quick
def test_a_precomputed_reference_must_fit_one_worker_whole(tmp_path):
    """preference.precompute_reference loads the whole starting model on each of its workers, whatever
    the strategy shards: its weights (counted by transformers) plus one forward pass of the chosen and
    rejected answers (a layer's transients, the answers' fp32 logits and log-softmax) must fit, else the
    run stops before any work, naming the field and the fix, and a search rejects such a trial."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from raylm.planning.plan import HEADROOM, precompute_reason, unfit_reason
    from raylm.spec.loading import validate_dict
    from raylm.spec.reading import SpecError
    from raylm.train.finetune import refuse_unfit_precompute

    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2
    )
    config.save_pretrained(tmp_path / "base")
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    spec = {
        "kind": "finetune",
        "model": {"path": str(tmp_path / "base")},
        "method": "full",
        "data": {"path": str(tmp_path / "pairs.jsonl"), "format": "preference", "seq_len": 32},
        "preference": {"objective": "dpo", "precompute_reference": True},
        "train": {"batch_size": 4},
        "strategy": {"name": "auto", "memory_per_worker_gb": 1e-6},
        "output": str(tmp_path / "out"),
    }
    job = validate_dict(spec)
    rows, seq = 8, 32  # 4 examples x (chosen, rejected)
    layer = rows * seq * (10 * 64 + 4 * 128) * 4  # no attention scores: SDPA's flash kernel, no dropout
    # + a CPU worker's own memory beyond the model in fp32 (memory.CPU_PROCESS, BENCHMARKS.md)
    needed = params * 4 + layer + 2 * rows * seq * 300 * 4 + 53 * 2**20
    assert precompute_reason(job, needed / HEADROOM * 1.001) is None
    assert "holds the whole starting model on one worker" in precompute_reason(job, needed / HEADROOM * 0.999)
    assert "whole starting model" in unfit_reason(job, needed / HEADROOM * 0.999)
    with pytest.raises(SpecError) as err:
        refuse_unfit_precompute(job)  # memory_per_worker_gb: 1e-6 (the check needs no Ray then)
    ((field, message),) = err.value.problems
    assert field == "preference.precompute_reference"
    assert "set it to false (a live reference is sharded like the model under fsdp or ZeRO-3)" in message
    assert not (tmp_path / "out").exists()
