"""Grids of runs: `ddp-finetune sweep` expands a grid into runs, each in its own output_dir under one
sweep folder, runs them here (one after another or K at a time) or as ONE SLURM job array, and a
re-run of the same command resumes; `ddp-finetune sweep-report` makes one results table of them.

    ddp-finetune sweep my_run.yaml optim.lr=0.01,0.03 freeze.epochs=0,1 --seeds 0-2 --out sweeps/lr
    ddp-finetune sweep my_run.yaml optim.lr=0.01,0.03 --seeds 0-2 --out sweeps/lr --slurm slurm/cpu.sbatch --max-parallel 4
    ddp-finetune sweep-report sweeps/lr            # results.csv, results.md, results.png

A `key=a,b` (a comma outside brackets and quotes) is swept; a plain `key=value` overrides every
element. `--seeds 0-2` sweeps `seed` last. The sweep folder holds:

    sweep.json          the manifest: the grid, and every element's name and overrides (written atomically)
    config.yaml         the CONFIG as it was when the sweep started; every element trains from it
    <element name>/     each element's output_dir (config.yaml, metrics.jsonl, checkpoints/, summary.json)
    logs/               the job array's logs (--slurm)

An element is finished when its summary.json exists: a re-run skips it, and every other element
runs with `checkpoint.resume=auto`, so an interrupted one continues from its newest checkpoint.
A re-run with another grid into the same folder is refused (exit 2): the results table would mix
two experiments. Under SLURM, each array task reads its element from the manifest
(`ddp-finetune sweep-element`, called by slurm/common.sh) and is the same preemption-safe, requeued
job a single run is.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ddp_finetune.errors import UserError
from ddp_finetune.files import atomic_path, atomic_write_text
from ddp_finetune.training.preemption import EXIT_PREEMPTED, PREEMPTED_FILE, STOP_FILE

MANIFEST = "sweep.json"
CONFIG_COPY = "config.yaml"
LOGS = "logs"
ELEMENT_LOG = "sweep.log"
FAILED_FILE = "failed.json"
SEED_KEY = "seed"
# the sweep decides these for every element: a value from the user would break the layout or resume
_RESERVED = {"output_dir": "the sweep gives every element its own output_dir under --out",
             "checkpoint.resume": "the sweep always resumes (checkpoint.resume=auto)"}  # fmt: skip
_SAFE = re.compile(r"[^A-Za-z0-9.+-]+")
_MAX_NAME = 120


# --------------------------------------------------------------------------- the grid


def split_values(text: str) -> list[str]:
    """`a,b,[1,2]` -> ['a', 'b', '[1,2]']: commas inside brackets, braces or quotes do not split."""
    values, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return values


def parse_seeds(text: str) -> list[int]:
    """`0-2` -> [0, 1, 2]; `0,5,7` -> [0, 5, 7]; `3` -> [3]."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            low, dash, high = part.strip().partition("-")
            span = range(int(low), int(high) + 1) if dash else [int(low)]
            if not span:
                raise ValueError
            seeds.extend(span)
    except ValueError:
        raise UserError(
            f"--seeds {text!r} is not a range or list of seeds >= 0; e.g. --seeds 0-2 or --seeds 0,5,7"
        ) from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds {text!r} repeats a seed or has a negative one; e.g. --seeds 0-2")
    return seeds


@dataclass
class Grid:
    """What a sweep command asks for: the config, the overrides of every element, the swept keys."""

    config: str
    overrides: list[str] = field(default_factory=list)
    swept: dict[str, list[str]] = field(default_factory=dict)
    """key -> its values as written (each becomes `key=value`), in command-line order; `seed` last."""

    def spec(self) -> dict:
        return {"overrides": self.overrides, "swept": self.swept}


def parse_grid(config: str, tokens: list[str], seeds: str | None) -> Grid:
    """The grid of `CONFIG key=v1,v2 key=value ... [--seeds S]`; one-line errors for bad input."""
    grid = Grid(str(config))
    seen: set[str] = set()
    for token in tokens:
        key, eq, raw = token.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UserError(f"{token!r} is not key=value or key=v1,v2,...; e.g. optim.lr=0.01,0.03")
        if key in seen:
            raise UserError(f"{key} is given twice; give it once, its values separated by commas: {key}=a,b")
        seen.add(key)
        if key in _RESERVED:
            raise UserError(f"{key} cannot be set in a sweep: {_RESERVED[key]}; remove {token!r}")
        values = split_values(raw)
        if len(values) == 1:
            grid.overrides.append(f"{key}={raw}")
            continue
        if any(not v.strip() for v in values):
            raise UserError(f"{token!r} has an empty value; separate the values with single commas: {key}=a,b")
        if len(set(values)) != len(values):
            raise UserError(f"{token!r} repeats a value; give each value once")
        grid.swept[key] = values
    if seeds is not None:
        if SEED_KEY in seen:
            raise UserError("seed is given both as a key and with --seeds; keep one of them")
        grid.swept[SEED_KEY] = [str(s) for s in parse_seeds(seeds)]
    if not grid.swept:
        raise UserError(
            "nothing to sweep: give at least one key with several values (optim.lr=0.01,0.03) or --seeds 0-2"
        )
    return grid


def _labels(keys: list[str]) -> dict[str, str]:
    """A short label per key for element names: its last part, the whole key when two share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def element_names(keys: list[str], combos: list[tuple[str, ...]]) -> list[str]:
    """Readable, filesystem-safe, unique folder names: `lr-0.01_seed-0`.

    Characters outside [A-Za-z0-9.+-] become `-`; when that makes two names equal (or a name too
    long), the element's index is appended, so every element keeps its own folder."""
    labels = _labels(keys)
    names = []
    for combo in combos:
        parts = [f"{labels[k]}-{_SAFE.sub('-', v).strip('-') or 'empty'}" for k, v in zip(keys, combo)]
        names.append("_".join(parts)[:_MAX_NAME].lstrip("."))
    repeated = {n for n in names if names.count(n) > 1}
    return [(f"{n}_{i}" if n in repeated else n) if n else f"element_{i}" for i, n in enumerate(names)]


def expand(grid: Grid, sweep_dir: Path) -> list[dict]:
    """The elements, in grid order (the last key varies fastest): index, name, values, overrides."""
    import itertools

    keys = list(grid.swept)
    combos = list(itertools.product(*grid.swept.values()))
    names = element_names(keys, combos)
    elements = []
    for i, (name, combo) in enumerate(zip(names, combos)):
        values = dict(zip(keys, combo))
        overrides = [*grid.overrides, *(f"{k}={v}" for k, v in values.items()), f"output_dir={sweep_dir / name}"]
        elements.append({"index": i, "name": name, "values": values, "overrides": overrides})
    return elements


# --------------------------------------------------------------------------- the manifest


def _config_text(config: str) -> str:
    from ddp_finetune.config.parsing import config_source

    source = config_source(config)
    if not source.is_file():
        raise UserError(f"config file {config!r} does not exist; give the path to a YAML config or @NAME")
    return source.read_text()


def prepare_sweep(config: str, tokens: list[str], seeds: str | None, out) -> tuple[Path, dict]:
    """Check the grid, and write (or re-read) the sweep folder's manifest; (sweep folder, manifest).

    Every element's config is loaded and checked here, so a bad value stops the sweep before any
    element trains. The same grid into the same folder returns the existing manifest."""
    from ddp_finetune.config import load_config

    grid = parse_grid(config, tokens, seeds)
    sweep_dir = Path(out).absolute()
    text = _config_text(config)
    path = sweep_dir / MANIFEST
    if path.is_file():
        manifest = read_manifest(sweep_dir)
        old = {"config": manifest["source_config"], **manifest["grid"]}
        new = {"config": grid.config, **grid.spec()}
        if old != new:
            raise UserError(
                f"{sweep_dir} holds another sweep ({_describe(old)}; this command: {_describe(new)}); "
                "re-run the same command to resume it, or give another --out"
            )
        if (sweep_dir / CONFIG_COPY).read_text() != text:
            raise UserError(
                f"{config} changed since the sweep in {sweep_dir} started; restore it to resume that sweep, "
                "or give another --out"
            )
        return sweep_dir, manifest
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise UserError(f"--out {str(sweep_dir)!r} is a file; give a folder for the sweep")
    elements = expand(grid, sweep_dir)
    copy = sweep_dir / CONFIG_COPY
    for element in elements:
        try:
            # the data may not be readable from this machine (a SLURM login node); keys and values are checked
            load_config(config, element["overrides"])
        except UserError as exc:
            raise UserError(f"element {element['name']}: {exc}") from None
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(copy, text)
    manifest = {
        "version": 1,
        "source_config": grid.config,
        "config": str(copy),
        "grid": grid.spec(),
        "elements": elements,
    }
    # written last: a folder with a manifest is a complete sweep description
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return sweep_dir, manifest


def _describe(spec: dict) -> str:
    swept = " ".join(f"{k}={','.join(v)}" for k, v in spec["swept"].items())
    return " ".join([spec["config"], *spec["overrides"], swept])


def read_manifest(sweep_dir) -> dict:
    path = Path(sweep_dir) / MANIFEST
    if not path.is_file():
        what = "does not exist" if not Path(sweep_dir).exists() else f"has no {MANIFEST}"
        raise UserError(f"sweep folder {str(sweep_dir)!r} {what}; give the --out folder of `ddp-finetune sweep`")
    try:
        manifest = json.loads(path.read_text())
        manifest["elements"], manifest["grid"]["swept"]  # noqa: B018 - the keys every reader needs
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a sweep manifest; give the --out folder of `ddp-finetune sweep`") from None
    return manifest


def element_dir(manifest: dict, element: dict) -> Path:
    return Path(manifest["config"]).parent / element["name"]


def element_args(manifest_path, index: int) -> list[str]:
    """CONFIG and overrides of one element: what a SLURM array task trains (`sweep-element`)."""
    path = Path(manifest_path)
    manifest = read_manifest(path.parent if path.name == MANIFEST else path)
    elements = manifest["elements"]
    if not 0 <= index < len(elements):
        raise UserError(f"element {index} is not in {path} (it has {len(elements)}: 0-{len(elements) - 1})")
    args = [manifest["config"], *elements[index]["overrides"]]
    if any("\n" in a for a in args):  # one argument per line for the batch shell
        raise UserError(f"element {index} of {path} has a value with a line break; sweep values are one line each")
    return args


# --------------------------------------------------------------------------- running here


def status_of(folder: Path) -> str:
    """finished, failed, preempted, unfinished (started, no summary.json) or not started."""
    if (folder / "summary.json").is_file():
        return "finished"
    if (folder / FAILED_FILE).is_file():
        return "failed"
    if (folder / PREEMPTED_FILE).is_file():
        return "preempted"
    return "unfinished" if (folder / "config.yaml").is_file() else "not started"


class _Runner:
    """Runs elements as `python -m ddp_finetune train` children, K at a time, and stops them on a signal.

    The children get their own session, so a Ctrl-C (or SIGTERM) reaches only this process. The
    first one touches each running element's stop file, the request the SLURM templates make
    (it reaches every rank whatever the launcher; slurm/README.md says why a file): each child checkpoints at
    its next step and exits 75 (preempted), as a single run does, and elements not started yet are
    not started. A second one is passed on to the children as SIGINT: they abort at once."""

    def __init__(self, manifest: dict, total: int):
        self.manifest = manifest
        self.total = total
        self.stopping = False
        self.signalled = False
        self.children: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.results: dict[str, str] = {}

    def on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        with self.lock:
            running = [(i, c) for i, c in self.children.items() if c.poll() is None]
            if self.signalled:
                print(f"sweep: {name} again: aborting the running elements", flush=True)
                for _, child in running:
                    child.send_signal(signal.SIGINT)  # a run's second SIGINT aborts it
                return
            self.signalled = self.stopping = True
            for index, _ in running:
                (element_dir(self.manifest, self.manifest["elements"][index]) / STOP_FILE).touch()
        print(f"sweep: {name}: the running elements checkpoint at their next step and stop", flush=True)

    def run(self, element: dict) -> None:
        name, folder = element["name"], element_dir(self.manifest, element)
        if self.stopping:
            self.results[name] = "not started"
            return
        folder.mkdir(parents=True, exist_ok=True)
        (folder / FAILED_FILE).unlink(missing_ok=True)
        (folder / STOP_FILE).unlink(missing_ok=True)  # an old request would stop the resumed run at once
        cmd = [sys.executable, "-m", "ddp_finetune", "train", self.manifest["config"], *element["overrides"]]
        cmd.append("checkpoint.resume=auto")
        t0 = time.monotonic()
        with open(folder / ELEMENT_LOG, "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            with self.lock:
                if self.stopping:
                    self.results[name] = "not started"
                    return
                child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                self.children[element["index"]] = child
            print(
                f"sweep: [{element['index'] + 1}/{self.total}] {name}: started (log {folder / ELEMENT_LOG})", flush=True
            )
            code = child.wait()
        with self.lock:
            del self.children[element["index"]]
        took = f"{time.monotonic() - t0:.0f} s"
        if code == 0:
            val = json.loads((folder / "summary.json").read_text()).get("val", {})
            shown = ", ".join(f"{k} {v:.4f}" for k, v in val.items() if isinstance(v, float))
            print(f"sweep: {name}: done in {took}: validation {shown}", flush=True)
            self.results[name] = "finished"
        elif code == EXIT_PREEMPTED:
            print(f"sweep: {name}: stopped after {took}, checkpoint saved; re-run the sweep to resume it", flush=True)
            self.results[name] = "preempted"
            self.stopping = True  # a stop request (signal, stop file) ends the sweep, not only this element
        else:
            last = _last_line(folder / ELEMENT_LOG)
            atomic_write_text(folder / FAILED_FILE, json.dumps({"exit_code": code, "last_line": last}) + "\n")
            print(f"sweep: {name}: FAILED (exit {code}) after {took}: {last}", flush=True)
            self.results[name] = "failed"


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def run_local(sweep_dir: Path, manifest: dict, max_parallel: int) -> int:
    """Run every unfinished element here; 0 all finished, 75 stopped (resumable), 1 some failed."""
    elements = manifest["elements"]
    todo = [e for e in elements if status_of(element_dir(manifest, e)) != "finished"]
    print(
        f"sweep {sweep_dir}: {len(elements)} elements, {len(elements) - len(todo)} finished (skipped), "
        f"{len(todo)} to run, {max_parallel} at a time",
        flush=True,
    )
    runner = _Runner(manifest, len(elements))
    previous = {s: signal.signal(s, runner.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(max_workers=max_parallel) as pool:
            for future in [pool.submit(runner.run, e) for e in todo]:
                future.result()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    counts = {s: list(runner.results.values()).count(s) for s in ("finished", "preempted", "failed", "not started")}
    done = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(f"sweep {sweep_dir}: {done or 'nothing to run, every element is finished'}", flush=True)
    print(f"sweep: results with `ddp-finetune sweep-report {sweep_dir}`", flush=True)
    if counts["failed"]:
        failed = [n for n, s in runner.results.items() if s == "failed"]
        print(
            f"sweep: failed: {', '.join(failed)}; see their {ELEMENT_LOG}; re-run the sweep to retry them", flush=True
        )
        return 1
    if counts["preempted"] or counts["not started"]:
        print("sweep: stopped; re-run the same command to resume it", flush=True)
        return EXIT_PREEMPTED
    return 0


# --------------------------------------------------------------------------- SLURM


def array_spec(indices: list[int], max_parallel: int | None) -> str:
    """`--array` value: [0, 1, 2, 5] -> `0-2,5`, with `%K` to run at most K at a time."""
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts) + (f"%{max_parallel}" if max_parallel else "")


def submit_slurm(sweep_dir: Path, manifest: dict, template, max_parallel: int | None, sbatch_options: str) -> int:
    """Submit ONE job array of the unfinished elements with a batch template from slurm/."""
    template = Path(template)
    if not template.is_file():
        raise UserError(f"SLURM template {str(template)!r} does not exist; give one of slurm/*.sbatch")
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("--slurm needs sbatch, which is not on PATH; run on a SLURM login node, or drop --slurm")
    elements = manifest["elements"]
    todo = [e["index"] for e in elements if status_of(element_dir(manifest, e)) != "finished"]
    if not todo:
        print(f"sweep {sweep_dir}: all {len(elements)} elements finished; nothing to submit", flush=True)
        return 0
    (sweep_dir / LOGS).mkdir(exist_ok=True)
    cmd = [
        sbatch,
        "--parsable",
        f"--array={array_spec(todo, max_parallel)}",
        f"--job-name=sweep-{sweep_dir.name}",
        # one log per element, kept across requeues (the templates append)
        f"--output={sweep_dir / LOGS}/%A_%a.out",
        *shlex.split(sbatch_options or ""),
        str(template.absolute()),
        str(sweep_dir / MANIFEST),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"sbatch refused the job array: {why}; check the --sbatch options and the template")
    job = proc.stdout.strip().split(";")[0]
    print(
        f"sweep {sweep_dir}: submitted job array {job} of {len(todo)} elements "
        f"({len(elements) - len(todo)} finished, skipped): {shlex.join(cmd[1:])}",
        flush=True,
    )
    print(
        f"sweep: logs in {sweep_dir / LOGS}/{job}_<index>.out; watch with `squeue -r -j {job}`; "
        f"results with `ddp-finetune sweep-report {sweep_dir}`",
        flush=True,
    )
    return 0


def sweep_command(config, tokens, seeds, out, slurm, max_parallel, sbatch_options) -> int:
    if max_parallel is not None and max_parallel < 1:
        raise UserError(f"--max-parallel {max_parallel} must be >= 1")
    if sbatch_options and not slurm:
        raise UserError("--sbatch options are for --slurm; add --slurm TEMPLATE or drop them")
    sweep_dir, manifest = prepare_sweep(config, tokens, seeds, out)
    if slurm:
        return submit_slurm(sweep_dir, manifest, slurm, max_parallel, sbatch_options)
    return run_local(sweep_dir, manifest, max_parallel or 1)


# --------------------------------------------------------------------------- the report

DEFAULT_METRIC = {"classification": "top1", "segmentation": "mean_iou", "binary": "accuracy", "multilabel": "accuracy"}


@dataclass
class Setting:
    """One point of the grid without the seed: its values and its elements' metric."""

    values: dict[str, str]
    scores: list[float] = field(default_factory=list)
    elements: int = 0

    def stats(self) -> dict:
        s = self.scores
        if not s:
            return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
        std = statistics.stdev(s) if len(s) > 1 else None  # sample std over seeds; one seed has none
        return {"n": len(s), "mean": statistics.fmean(s), "std": std, "min": min(s), "max": max(s)}


def _task(manifest: dict) -> str:
    from ddp_finetune.config import load_config

    return load_config(manifest["config"], manifest["elements"][0]["overrides"]).task


def report(sweep_dir, metric: str | None = None, mode: str | None = None) -> dict:
    """Read every element's summary.json; write results.csv, results.md and results.png. Returns
    {metric, mode, settings, best, missing}."""
    sweep_dir = Path(sweep_dir)
    manifest = read_manifest(sweep_dir)
    key = (metric or DEFAULT_METRIC[_task(manifest)]).removeprefix("val/")
    mode = mode or ("min" if "loss" in key else "max")
    swept = [k for k in manifest["grid"]["swept"] if k != SEED_KEY]
    settings: dict[tuple, Setting] = {}
    missing: list[tuple[str, str, str]] = []
    available: set[str] = set()
    for element in manifest["elements"]:
        values = {k: element["values"][k] for k in swept}
        setting = settings.setdefault(tuple(values.values()), Setting(values))
        setting.elements += 1
        folder = element_dir(manifest, element)
        status = status_of(folder)
        if status != "finished":
            why = json.loads((folder / FAILED_FILE).read_text())["last_line"] if status == "failed" else ""
            missing.append((element["name"], status, why))
            continue
        val = json.loads((folder / "summary.json").read_text()).get("val", {})
        available.update(k for k, v in val.items() if isinstance(v, float))
        if not isinstance(val.get(key), float) or not math.isfinite(val[key]):
            missing.append((element["name"], "no metric", f"val has no finite {key!r}"))
            continue
        setting.scores.append(val[key])
    if available and key not in available:
        raise UserError(
            f"--metric val/{key} is not in the elements' summary.json; the validation metrics are "
            + ", ".join(f"val/{k}" for k in sorted(available))
        )
    scored = [s for s in settings.values() if s.scores]
    pick = max if mode == "max" else min
    best = pick(scored, key=lambda s: s.stats()["mean"]) if scored else None
    rows = list(settings.values())
    atomic_write_text(sweep_dir / "results.csv", _csv(rows, swept, key, best))
    atomic_write_text(sweep_dir / "results.md", _markdown(sweep_dir, manifest, rows, swept, key, mode, best, missing))
    picture = _draw(sweep_dir / "results.png", rows, swept, key) if swept and scored else None
    return {"metric": key, "mode": mode, "settings": rows, "best": best, "missing": missing, "picture": picture}


def _fmt(x) -> str:
    return "" if x is None else f"{x:.6g}"


def _csv(rows: list[Setting], swept: list[str], key: str, best: Setting | None) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*swept, "metric", "n", "elements", "mean", "std", "min", "max", "best"])
    for s in rows:
        st = s.stats()
        # repr-exact floats: two sweeps of the same grid give the same file, byte for byte
        nums = ["" if st[k] is None else repr(st[k]) for k in ("mean", "std", "min", "max")]
        writer.writerow([*s.values.values(), f"val/{key}", st["n"], s.elements, *nums, int(s is best)])
    return buf.getvalue()


def _markdown(sweep_dir, manifest, rows, swept, key, mode, best, missing) -> str:
    seeds = manifest["grid"]["swept"].get(SEED_KEY)
    head = [*swept, "n", f"mean val/{key}", "std", "min", "max", ""]
    lines = [
        f"# Sweep {sweep_dir.name}",
        "",
        f"`{_describe({'config': manifest['source_config'], **manifest['grid']})}`",
        "",
        f"{len(manifest['elements'])} elements; metric val/{key} ({mode}), statistics over "
        + (f"seeds {', '.join(seeds)}" if seeds else "the elements of each setting")
        + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for s in rows:
        st = s.stats()
        mark = "**best**" if s is best else ""
        cells = [*s.values.values(), f"{st['n']}/{s.elements}", *(_fmt(st[k]) for k in ("mean", "std", "min", "max"))]
        lines.append("| " + " | ".join([*cells, mark]) + " |")
    if best is not None:
        shown = ", ".join(f"{k}={v}" for k, v in best.values.items()) or "the only setting"
        lines += ["", f"Best ({mode} mean val/{key}): {shown}, {_fmt(best.stats()['mean'])}."]
    lines += ["", "## Not finished", ""]
    if missing:
        lines += [f"- {name}: {status}" + (f" ({why})" if why else "") for name, status, why in missing]
        lines += ["", "Re-run the same `ddp-finetune sweep` command to run or resume them."]
    else:
        lines.append("none: every element finished.")
    return "\n".join(lines) + "\n"


def _numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _draw(path: Path, rows: list[Setting], swept: list[str], key: str) -> Path:
    """One panel per swept key: the metric against its values, one line per combination of the other
    keys (mean over seeds, min-max as a band), every seed's value as a dot."""
    from ddp_finetune.inference.pictures import new_figure

    fig = new_figure(figsize=(5 * len(swept), 4))
    axes = fig.subplots(1, len(swept), squeeze=False)[0]
    for ax, k in zip(axes, swept):
        order = list(dict.fromkeys(s.values[k] for s in rows))
        nums = _numeric(order)
        xs = dict(zip(order, nums if nums else range(len(order))))
        if nums and min(nums) > 0 and max(nums) / min(nums) >= 10:
            ax.set_xscale("log")  # learning rates and the like span decades
        groups: dict[tuple, list[Setting]] = {}
        for s in rows:
            groups.setdefault(tuple(v for o, v in s.values.items() if o != k), []).append(s)
        for other, members in groups.items():
            done = [s for s in members if s.scores]
            if not done:
                continue
            x = [xs[s.values[k]] for s in done]
            label = ", ".join(f"{o}={v}" for o, v in zip([o for o in swept if o != k], other)) or None
            (line,) = ax.plot(x, [s.stats()["mean"] for s in done], marker="o", label=label)
            ax.fill_between(
                x, [min(s.scores) for s in done], [max(s.scores) for s in done], alpha=0.15, color=line.get_color()
            )
            for s in done:
                ax.scatter([xs[s.values[k]]] * len(s.scores), s.scores, s=10, color=line.get_color())
        if not nums:
            ax.set_xticks(list(xs.values()), order)
        ax.set_title("mean over seeds; band: min to max; dots: each run", fontsize="small")
        ax.set_xlabel(k)
        ax.set_ylabel(f"val/{key}")
        if len(groups) > 1:
            ax.legend(fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    return path


def report_command(sweep_dir, metric: str | None, mode: str | None) -> int:
    result = report(sweep_dir, metric, mode)
    sweep_dir = Path(sweep_dir)
    best = result["best"]
    print((sweep_dir / "results.md").read_text(), end="", flush=True)
    written = ["results.csv", "results.md"] + (["results.png"] if result["picture"] else [])
    print(f"wrote {', '.join(str(sweep_dir / w) for w in written)}", flush=True)
    if best is None:
        print("sweep-report: no element has finished yet", file=sys.stderr, flush=True)
    return 0
