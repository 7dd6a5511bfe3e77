"""What a person sees while a job runs: raylm's own lines, in order, and a progress bar on a terminal.

Rank 0 of the training workers sends its lines and metric rows through a Ray queue to the driver,
which prints them: on a terminal, one progress bar (step, loss, tokens/s, ETA) with raylm's other
lines above it; elsewhere (a log file, a Ray job's log), one plain line per logged step. Ray's own
INFO chatter (Ray Data's execution plans, Ray Train's per-report lines) stays in Ray's session logs
unless `raylm run --verbose`; warnings and errors from any process still reach the console.

    channel = Console.start(total_steps)     # driver
    emit("[raylm] ...") / progress(row)      # rank 0 (raylm.train.metrics routes to the channel)
    channel.close()                          # driver, after fit: everything sent is printed
"""

from __future__ import annotations

import sys
import threading


class Console:
    """The driver's end: a queue actor and a thread that prints what arrives."""

    def __init__(self, total_steps: int, stream=None):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node: a queue on a worker's node would die with it, and a run that goes on
        # after losing that node (failure.max_failures, elastic workers) would lose its console
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.total = total_steps
        self.stream = stream or sys.stdout
        self.bar = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _show(self, item) -> None:
        kind, payload = item
        if kind == "row":
            if self.stream.isatty():
                self._bar(payload)
            else:
                self._line(format_progress(payload, self.total))
        else:
            self._line(payload)

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _bar(self, row: dict) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=0, unit="step", file=self.stream, dynamic_ncols=True)
        self.bar.update(row["step"] - self.bar.n)
        parts = {"loss": f"{row['loss']:.4f}"} if "loss" in row else {}
        if "tokens_per_s" in row:
            parts["tok/s"] = f"{row['tokens_per_s']:,.0f}"
        if "val_loss" in row:
            parts["val_loss"] = f"{row['val_loss']:.4f}"
        self.bar.set_postfix(parts, refresh=True)

    def _drain(self) -> None:
        from ray.util.queue import Empty

        # A waiting get returns as soon as an item arrives; the long timeout only bounds how often an
        # idle console asks (each ask is an actor call, CPU taken from training on a small machine).
        while True:
            try:
                item = self.queue.get(timeout=5)
            except Empty:
                if self.done.is_set():
                    return
                continue
            except Exception:  # the queue actor is gone (Ray shut down): nothing more will come
                return
            if item == _END:
                return
            self._show(item)

    def close(self) -> None:
        """Print what is still queued, end the bar and the queue actor."""
        self.done.set()
        try:
            self.queue.put(_END)  # behind everything sent: the drain prints those, then stops
        except Exception:  # the queue actor is gone (Ray shut down)
            pass
        self.thread.join(timeout=30)
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        try:
            self.queue.shutdown(force=True)
        except Exception:  # already gone with its Ray
            pass


_END = ("end", None)  # put by close() after everything the workers sent


def format_progress(row: dict, max_steps: int) -> str:
    """One progress line for logs: step, loss, learning rate, throughput, eval."""
    parts = [f"step {row['step']}/{max_steps}"]
    if "loss" in row:
        parts.append(f"loss {row['loss']:.4f}")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}")
    if "tokens_per_s" in row:
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    if "val_ppl" in row:
        parts.append(f"val_loss {row['val_loss']:.4f} ppl {row['val_ppl']:.2f}")
    elif "val_loss" in row:
        parts.append(f"val_loss {row['val_loss']:.4f}")
    if "reward_accuracy" in row:
        parts.append(f"reward_acc {row['reward_accuracy']:.3f}")
    return "[raylm] " + " | ".join(parts)
