"""Each worker's batches, read straight from the tokenized cache (raylm/data/cache.py).

An epoch is one order of the cache's rows, the same on every worker: the rows are cut into windows
of `data.shuffle_buffer` rows, the windows visited in a seeded random order and each one shuffled
(seed: train.seed and the epoch). Micro-batch j of the epoch is rows [j*B, (j+1)*B) of that order,
and worker r trains on j = r, r + W, r + 2W, ...: the workers' rows are disjoint and together cover
the epoch. A position is just j, so a resumed run starts reading at its micro-batch without touching
what came before, and an elastic run continues at the same global position with a new W.
With `group_by_length`, rows are sorted by length within runs of 64 micro-batches of that order (as
transformers' length-grouped sampler does), so a micro-batch holds examples of similar length; the
micro-batches of a run are then visited in a seeded order (the same on every worker), so that no
rank always gets the longest.
"""

from __future__ import annotations

import numpy as np

GROUP_RUN = 64  # micro-batches sorted by length together
READ_BYTES = 32 * 2**20  # rows fetched at once when there is no shuffle window


class CachedSplit:
    """One split of a cache: contiguous row ranges read from its Parquet files."""

    def __init__(self, where: str, split: str, info: dict, extra: dict[str, np.ndarray] | None = None):
        """`extra`: whole columns kept beside the cache's, indexed by row (a preference run's
        precomputed reference log-probabilities)."""
        from raylm.data.sources import filesystem

        self.fs, root = filesystem(where)
        self.folder = f"{root}/{split}"
        self.rows = info["rows"]
        self.columns = info["columns"]
        self.files = info["files"]
        self.file_starts = np.cumsum([0] + [f["rows"] for f in self.files])
        self.extra = extra or {}
        self.opened: dict[int, object] = {}
        self.row_bytes = sum(4 * int(np.prod(c["shape"] or [1])) for c in self.columns.values())

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) as int32 arrays of each column's shape (and the extra columns')."""
        parts = []
        first = int(np.searchsorted(self.file_starts, start, side="right") - 1)
        for index in range(first, len(self.files)):
            lo, hi = self.file_starts[index], self.file_starts[index + 1]
            if lo >= stop:
                break
            parts.append(self._read_file(index, max(start, lo) - lo, min(stop, hi) - lo))
        rows = {name: np.concatenate([p[name] for p in parts]) for name in self.columns}
        return rows | {name: values[start:stop] for name, values in self.extra.items()}

    def _read_file(self, index: int, start: int, stop: int) -> dict[str, np.ndarray]:
        import pyarrow.parquet as pq

        if index not in self.opened:
            path = f"{self.folder}/{self.files[index]['name']}"
            self.opened[index] = pq.ParquetFile(self.fs.open_input_file(path))
        file = self.opened[index]
        sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
        starts = np.cumsum([0, *sizes])
        groups = [g for g in range(len(sizes)) if starts[g] < stop and starts[g + 1] > start]
        table = file.read_row_groups(groups).slice(start - starts[groups[0]], stop - start)
        out = {}
        for name, column in self.columns.items():
            flat = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            out[name] = flat.reshape(stop - start, *column["shape"])
        return out


class EpochOrder:
    """The order of an epoch's rows: seeded windows, each shuffled, or the cache's own order."""

    def __init__(self, rows: int, window: int, shuffle: bool, seed: int, epoch: int):
        self.rows, self.window, self.shuffle, self.seed, self.epoch = rows, window, shuffle, seed, epoch
        count = -(-rows // window)
        self.visit = np.random.default_rng([seed, epoch]).permutation(count) if shuffle else np.arange(count)
        sizes = np.minimum(window, rows - self.visit * window)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self._last: tuple | None = None  # (window, its order)

    def windows(self, start: int, stop: int):
        """(window's first row, its size, the slice of its order) covering positions [start, stop)."""
        k = int(np.searchsorted(self.starts, start, side="right") - 1)
        while start < stop:
            w = int(self.visit[k])
            size = int(self.starts[k + 1] - self.starts[k])
            a, b = start - int(self.starts[k]), min(stop - int(self.starts[k]), size)
            yield w * self.window, size, self.permutation(w, size)[a:b]
            start += b - a
            k += 1

    def permutation(self, w: int, size: int) -> np.ndarray:
        """Window w's order, kept while micro-batches come from it (one draw per window, not per batch)."""
        if self._last is None or self._last[0] != w:
            order = (
                np.random.default_rng([self.seed, self.epoch, w]).permutation(size)
                if self.shuffle
                else np.arange(size)
            )
            self._last = (w, order)
        return self._last[1]


class TrainShard:
    """This worker's micro-batches of an epoch (see the module docstring)."""

    def __init__(
        self,
        split: CachedSplit,
        rank: int,
        world: int,
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        group_by_length: bool = False,
    ):
        self.split, self.rank, self.world, self.batch_size = split, rank, world, batch_size
        self.seed, self.group_by_length = seed, group_by_length
        self.shuffle = shuffle_buffer > 0
        self.window = shuffle_buffer or max(batch_size * world, READ_BYTES // max(1, split.row_bytes))
        self.batches = split.rows // batch_size  # full micro-batches in an epoch
        self.rows_returned = 0  # what this worker was handed (tests count it)
        self._held: tuple | None = None  # the last window read
        self._run: tuple | None = None  # the last length-sorted run

    @property
    def per_worker(self) -> int:
        """Micro-batches each worker trains on in a whole epoch."""
        return self.batches // self.world

    def epoch(self, epoch: int, start: int):
        """(j, micro-batch) for this worker's j from global position `start` to the epoch's end
        (the last micro-batches that would not give every worker one are left out)."""
        order = EpochOrder(self.split.rows, self.window, self.shuffle, self.seed, epoch)
        end = start + (self.batches - start) // self.world * self.world
        for j in range(start + self.rank, end, self.world):
            batch = self._grouped(order, epoch, j) if self.group_by_length else self._rows(order, j)
            self.rows_returned += self.batch_size
            yield j, batch

    def _rows(self, order: EpochOrder, j: int, size: int | None = None) -> dict[str, np.ndarray]:
        size = size or self.batch_size
        parts = []
        for first, count, picked in order.windows(j * self.batch_size, j * self.batch_size + size):
            key = (order.epoch, first)
            if self._held is None or self._held[0] != key:
                self._held = (key, self.split.read(first, first + count))
            parts.append({k: v[picked] for k, v in self._held[1].items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _grouped(self, order: EpochOrder, epoch: int, j: int) -> dict[str, np.ndarray]:
        run = j // GROUP_RUN
        if self._run is None or self._run[0] != (epoch, run):
            first = run * GROUP_RUN
            size = (min(self.batches, first + GROUP_RUN) - first) * self.batch_size
            rows = self._rows(order, first, size)
            longest_first = np.argsort(-rows["attention_mask"].reshape(size, -1).sum(1), kind="stable")
            # whole micro-batches in a seeded order: sorted ones would hand rank 0 the longest every time
            batches = longest_first.reshape(-1, self.batch_size)
            mixed = np.random.default_rng((self.seed, epoch, run)).permutation(len(batches))
            order_ = batches[mixed].reshape(-1)
            self._run = ((epoch, run), {k: v[order_] for k, v in rows.items()})
        offset = (j - run * GROUP_RUN) * self.batch_size
        return {k: v[offset : offset + self.batch_size] for k, v in self._run[1].items()}


def val_batches(split: CachedSplit, rank: int, world: int, batch_size: int, limit: int | None):
    """This worker's validation batches: rows r, r + W, ... (every worker the same count), in order."""
    usable = split.rows // world * world
    chunk = batch_size * world
    for i, start in enumerate(range(0, usable, chunk)):
        if limit is not None and i >= limit:
            return
        rows = split.read(start, min(start + chunk, usable))
        yield {k: v[rank::world] for k, v in rows.items()}


def to_longest(batch: dict) -> dict:
    """A right-padded supervised batch cut to its longest example (dynamic padding): the positions
    removed are padding on every row (attention 0, label ignored), so the loss is unchanged."""
    mask = batch.get("attention_mask")
    if mask is None:
        return batch  # packed pretraining blocks: every position is a token
    width = int(mask.reshape(-1, mask.shape[-1]).sum(dim=1).max())
    if width == mask.shape[-1]:
        return batch
    return {k: v[..., :width] if v.shape == mask.shape else v for k, v in batch.items()}
