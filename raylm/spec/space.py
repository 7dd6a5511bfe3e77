"""A search space over a fine-tuning spec's fields, by dotted path, and what it becomes for Ray Tune.

    search:
      train.lr: {loguniform: [1.0e-4, 3.0e-2]}
      method:
        choice:
          - {name: lora, r: {choice: [4, 8, 16]}, alpha: {choice: [8, 16, 32]}}
          - {name: ia3}

A trial's config (what Tune samples) is flat: one key per dotted path, `method` (the label of the
method option), and `method.<label>.<field>` for the searched fields of that option only, so a method's
own fields are sampled (optuna) or applied (random, grid) only on trials of that method.

Pure Python: the spec validator imports this module; Ray and Optuna load inside the functions that
need them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

DISTRIBUTIONS = {
    "choice": "one of a list",
    "grid": "every value of a list (each combination is a trial)",
    "uniform": "[low, high], uniform",
    "loguniform": "[low, high], uniform in log space (learning rates)",
    "randint": "[low, high], an integer, both ends included",
    "qrandint": "[low, high, q], an integer multiple of q, both ends included",
}


class SpaceError(ValueError):
    """A problem with the search section: its dotted path and what to change."""

    def __init__(self, where: str, what: str):
        self.where, self.what = where, what
        super().__init__(f"{where}: {what}")


@dataclass(frozen=True)
class Dist:
    kind: str  # a key of DISTRIBUTIONS
    args: tuple

    def corners(self) -> list:
        """Values that validation tries: every listed value, or the ends of a range."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        return [self.args[0], self.args[1]]


@dataclass
class MethodOption:
    label: str  # unique among the options: the method's name, with the grid values it fixes
    fixed: dict[str, Any]  # name and fields with one value
    searched: dict[str, Dist] = field(default_factory=dict)
    varied: tuple[str, ...] = ()  # the fields the search sets: grid-fixed and sampled ones


@dataclass
class Space:
    params: dict[str, Any]  # dotted path -> Dist or a fixed value
    methods: list[MethodOption] | None = None  # None: the base's method (its fields may be searched)
    method_mode: str | None = None  # choice | grid

    # ---- what a trial's config means ------------------------------------------------------------

    def overrides(self, config: dict) -> dict[str, Any]:
        """The dotted-path values of a trial's `config`; `method` is a whole method block."""
        values = {path: config.get(path, value) for path, value in self.params.items()}
        if self.methods is not None:
            option = self.option(config["method"])
            values["method"] = {
                **option.fixed,
                **{name: config[f"method.{option.label}.{name}"] for name in option.searched},
            }
        return values

    def option(self, label: str) -> MethodOption:
        return next(o for o in self.methods or () if o.label == label)

    def searched_paths(self) -> list[str]:
        return [p for p, v in self.params.items() if isinstance(v, Dist)]

    # ---- Ray Tune's and Optuna's forms ------------------------------------------------------------

    def tune_params(self) -> dict:
        """Ray Tune's param_space (random and grid search: BasicVariantGenerator)."""
        space = {path: _tune_domain(v) if isinstance(v, Dist) else v for path, v in self.params.items()}
        if self.methods is not None:
            labels = [o.label for o in self.methods]
            space["method"] = _tune_domain(Dist(self.method_mode, tuple(labels)))
            for option in self.methods:
                for name, dist in option.searched.items():
                    space[f"method.{option.label}.{name}"] = _tune_domain(dist)
        return space

    def define_by_run(self, trial) -> None:
        """Optuna's define-by-run space: a method's fields are suggested only when it is chosen (fixed
        values need no suggestion: `overrides` supplies them)."""
        for path, value in self.params.items():
            if isinstance(value, Dist):
                _suggest(trial, path, value)
        if self.methods is not None:
            label = trial.suggest_categorical("method", [o.label for o in self.methods])
            for name, dist in self.option(label).searched.items():
                _suggest(trial, f"method.{label}.{name}", dist)


def parse(search: Any, algorithm: str) -> Space:
    """The search section as a Space; SpaceError names the first problem."""
    if not isinstance(search, dict) or not search:
        raise SpaceError(
            "search",
            "expected a mapping of dotted field paths to distributions, e.g. "
            "{train.lr: {loguniform: [1.0e-4, 1.0e-2]}}",
        )
    params, methods, mode = {}, None, None
    for path, value in search.items():
        where = f"search.{path}"
        if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
            raise SpaceError(f"search.{path}", "a key is a dotted field path such as train.lr")
        if path == "method":
            methods, mode = _method_options(value, algorithm)
        else:
            params[path] = _value(value, where, algorithm, nested=False)
    if methods is not None:
        clash = [p for p in params if p.startswith("method.")]
        if clash:
            raise SpaceError(
                f"search.{clash[0]}",
                "the method is searched too: put its fields under its option in search.method",
            )
    space = Space(params, methods, mode)
    if not space.searched_paths() and not (methods and (len(methods) > 1 or methods[0].searched)):
        raise SpaceError("search", "nothing is searched: give at least one field a distribution")
    return space


def has_grid(space: Space) -> bool:
    """Whether the space enumerates grid values (then one pass over them is the natural size)."""
    dists = [v for v in space.params.values() if isinstance(v, Dist)]
    return any(d.kind == "grid" for d in dists) or space.method_mode == "grid"


def corner_overrides(space: Space) -> list[tuple[str, dict]]:
    """Overrides that together try every listed value and range end of every distribution, for each
    method option: (the searched path it tries, the overrides), for validating the space up front."""
    out = []
    for option in space.methods or [None]:
        config = {"method": option.label} if option else {}
        for path, value in space.params.items():
            config[path] = value.corners()[0] if isinstance(value, Dist) else value
        if option:
            for name, dist in option.searched.items():
                config[f"method.{option.label}.{name}"] = dist.corners()[0]
        out.append(("method" if option else "search", space.overrides(config)))
        trying = [(p, p, v) for p, v in space.params.items() if isinstance(v, Dist)]
        if option:
            trying += [(f"method.{option.label}.{n}", f"method.{n}", d) for n, d in option.searched.items()]
        for key, where, dist in trying:
            for corner in dist.corners()[1:]:
                out.append((where, space.overrides({**config, key: corner})))
    return out


# ---- parsing --------------------------------------------------------------------------------------


def _value(value, where: str, algorithm: str, nested: bool):
    """A Dist for a one-key mapping naming a distribution, else the value itself (fixed)."""
    if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS):
        if isinstance(value, dict) and len(value) == 1 and _close_to_distribution(next(iter(value))):
            raise SpaceError(
                where,
                f"unknown distribution {next(iter(value))!r}; choose one of: {', '.join(DISTRIBUTIONS)}",
            )
        return value
    kind, args = next(iter(value.items()))
    if not isinstance(args, list) or not args:
        raise SpaceError(where, f"{kind} takes a list: {DISTRIBUTIONS[kind]}")
    if kind in ("choice", "grid"):
        if algorithm == "optuna" and kind == "grid":
            raise SpaceError(
                where, "optuna samples; it does not enumerate a grid: use choice, or algorithm: grid"
            )
        if algorithm == "grid" and kind != "grid":
            raise SpaceError(
                where, "algorithm grid enumerates grid values only: use grid, or algorithm: random"
            )
        if algorithm == "optuna" and any(not _scalar(v) for v in args):
            raise SpaceError(
                where, "optuna chooses among numbers, strings and booleans: use algorithm: random"
            )
        if nested and kind == "grid" and algorithm != "grid":
            raise SpaceError(where, "a grid inside a method option needs the method itself to be a grid")
        return Dist(kind, tuple(args))
    if algorithm == "grid":
        raise SpaceError(
            where,
            f"algorithm grid enumerates grid values only; {kind} samples: use algorithm random or optuna",
        )
    size = 3 if kind == "qrandint" else 2
    if len(args) != size or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        raise SpaceError(where, f"{kind} takes {DISTRIBUTIONS[kind]}")
    low, high = args[0], args[1]
    if not (math.isfinite(low) and math.isfinite(high)) or low > high or (kind != "uniform" and low == high):
        raise SpaceError(where, f"{kind} needs finite low < high, got {args}")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(where, f"loguniform needs low > 0, got {low}")
    if kind in ("randint", "qrandint") and not all(isinstance(a, int) for a in args):
        raise SpaceError(where, f"{kind} takes integers, got {args}")
    if kind == "qrandint" and (args[2] <= 0 or (high - low) % args[2]):
        raise SpaceError(where, f"qrandint needs q > 0 dividing high - low, got {args}")
    return Dist(kind, tuple(args))


def _method_options(value, algorithm: str) -> tuple[list[MethodOption], str]:
    where = "search.method"
    if isinstance(value, str) or (isinstance(value, dict) and "name" in value):
        value = {"grid" if algorithm == "grid" else "choice": [value]}
    if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("choice", "grid")):
        raise SpaceError(
            where,
            "expected {choice: [...]} or {grid: [...]} of method blocks, e.g. [{name: lora, r: {choice: [4, 8]}}, {name: ia3}]",
        )
    mode, options = next(iter(value.items()))
    if algorithm == "optuna" and mode == "grid":
        raise SpaceError(
            where, "optuna samples; it does not enumerate a grid: use choice, or algorithm: grid"
        )
    if algorithm == "grid" and mode != "grid":
        raise SpaceError(where, "algorithm grid enumerates grid values only: use grid, or algorithm: random")
    if not isinstance(options, list) or not options:
        raise SpaceError(where, f"{mode} takes a list of method blocks")
    parsed: list[MethodOption] = []
    for i, option in enumerate(options):
        at = f"{where}.{mode}.{i}"
        option = {"name": option} if isinstance(option, str) else option
        if not isinstance(option, dict) or not isinstance(option.get("name"), str):
            raise SpaceError(at, "a method block needs a name, e.g. {name: lora, r: {choice: [4, 8]}}")
        fixed, searched = {}, {}
        for name, v in option.items():
            parsed_value = _value(v, f"{at}.{name}", algorithm, nested=True)
            (searched if isinstance(parsed_value, Dist) else fixed)[name] = parsed_value
        grids = {n: d for n, d in searched.items() if d.kind == "grid"}
        rest = {n: d for n, d in searched.items() if d.kind != "grid"}
        for values in itertools.product(*(d.args for d in grids.values())):
            pinned = dict(zip(grids, values, strict=True))
            parsed.append(MethodOption(option["name"], {**fixed, **pinned}, dict(rest), (*pinned, *rest)))
    # Options of one method that differ in fixed fields (two LoRA set-ups, or a grid's values): those
    # fields are what the search varies; they name the options.
    for name in {o.label for o in parsed}:
        same = [o for o in parsed if o.label == name]
        if len(same) < 2:
            continue
        keys = sorted({k for o in same for k in o.fixed if k != "name"})
        differ = [k for k in keys if len({repr(o.fixed.get(k)) for o in same}) > 1]
        for o in same:
            o.varied = (*dict.fromkeys([*differ, *o.varied]),)
            o.label = f"{name}[" + ",".join(f"{k}={o.fixed.get(k)}" for k in differ) + "]" if differ else name
    seen: dict[str, int] = {}
    for option in parsed:  # options that are the same but for their sampled fields: number them
        seen[option.label] = seen.get(option.label, 0) + 1
        if seen[option.label] > 1:
            option.label = f"{option.label}#{seen[option.label]}"
    return parsed, mode


def _scalar(value) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _close_to_distribution(key) -> bool:
    import difflib

    return isinstance(key, str) and bool(difflib.get_close_matches(key, DISTRIBUTIONS, n=1, cutoff=0.75))


# ---- the libraries' forms ----------------------------------------------------------------------------


def _tune_domain(dist: Dist):
    from ray import tune

    kind, args = dist.kind, dist.args
    if kind == "choice":
        return tune.choice(list(args))
    if kind == "grid":
        return tune.grid_search(list(args))
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "loguniform":
        return tune.loguniform(*args)
    if kind == "randint":
        return tune.randint(args[0], args[1] + 1)  # Tune's upper bound is excluded
    return tune.qrandint(*args)  # inclusive, as here


def _suggest(trial, name: str, dist: Dist):
    kind, args = dist.kind, dist.args
    if kind == "choice":
        return trial.suggest_categorical(name, list(args))
    if kind == "uniform":
        return trial.suggest_float(name, *args)
    if kind == "loguniform":
        return trial.suggest_float(name, *args, log=True)
    if kind == "randint":
        return trial.suggest_int(name, *args)
    return trial.suggest_int(name, args[0], args[1], step=args[2])
