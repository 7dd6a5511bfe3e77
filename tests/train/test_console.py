"""What a person sees while a job runs: the driver's console prints, in order, everything rank 0 sent
before close() returns; of Ray's processes' output only warnings, errors, tracebacks and a search's
trial lines reach it."""

import io

import pytest

from raylm.runtime.ray_output import _important_only
from raylm.train.console import Console


def test_console_prints_everything_sent_in_order_before_close(ray_local):
    stream = io.StringIO()  # not a terminal: plain lines, no progress bar
    console = Console(10, stream=stream)
    console.queue.put(("line", "[raylm] 2 worker(s) on 1 node(s), device cpu"))
    for step in (5, 10):
        console.queue.put(("row", {"step": step, "loss": 1.5, "lr": 1e-3, "tokens_per_s": 1234.0}))
    console.queue.put(("line", "[raylm] done"))
    console.close()  # returns once everything put before it is printed
    assert stream.getvalue().splitlines() == [
        "[raylm] 2 worker(s) on 1 node(s), device cpu",
        "[raylm] step 5/10 | loss 1.5000 | lr 1.00e-03 | 1,234 tok/s",
        "[raylm] step 10/10 | loss 1.5000 | lr 1.00e-03 | 1,234 tok/s",
        "[raylm] done",
    ]


@pytest.mark.quick
def test_only_what_needs_attention_of_rays_output_reaches_the_console():
    printed = []
    handle = _important_only(lambda data: printed.extend(data["lines"]))
    handle(
        {
            "lines": [
                "INFO Reporting training result 3: TrainingReport(...)",
                "Running Dataset: dataset_1. Execution plan: InputDataBuffer[Input] -> TaskPoolMapOperator",
                "Warning: Detected no triton, on systems without Triton certain kernels will not work",
                "WARN  Python GIL is enabled: Multi-gpu quant acceleration for MoE models is sub-optimal",
                "WARNING the worker ran out of shared memory",
                "[raylm] trial 2 started: lora r=8",
                "Traceback (most recent call last):",
                '  File "loop.py", line 3, in train',
                "ValueError: bad batch",
            ]
        }
    )
    assert printed == [
        "WARNING the worker ran out of shared memory",
        "[raylm] trial 2 started: lora r=8",
        "Traceback (most recent call last):",
        '  File "loop.py", line 3, in train',
        "ValueError: bad batch",
    ]
