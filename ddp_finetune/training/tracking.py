"""metrics.jsonl (always), and wandb / tensorboard through Accelerate's trackers.

Only the main process writes; the values it writes are already global (reduced across ranks).
"""

from __future__ import annotations

import json
import math
import netrc
import os
import uuid
from pathlib import Path

from ddp_finetune.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def prepare_wandb_env() -> str:
    """Offline mode unless the user is logged in (or chose a mode). Returns the mode in effect."""
    if "WANDB_MODE" not in os.environ and not wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    return os.environ.get("WANDB_MODE", "online")


def wandb_run_id(output_dir) -> str:
    """The run id lives in the output folder, so a requeued or resumed job continues the same run."""
    path = Path(output_dir) / "wandb_run_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(path, run_id + "\n")
    return run_id


def log_with(cfg) -> str | None:
    if cfg.log.report_to == "wandb":
        prepare_wandb_env()
        return "wandb"
    if cfg.log.report_to == "tensorboard":
        return "tensorboard"
    return None


def init_trackers(accelerator, cfg) -> None:
    if cfg.log.report_to == "none":
        return
    name = cfg.log.run_name or Path(cfg.output_dir).resolve().name
    kwargs = {}
    if cfg.log.report_to == "wandb":
        run_id = wandb_run_id(cfg.output_dir) if accelerator.is_main_process else None
        kwargs = {"wandb": {"dir": str(cfg.output_dir), "name": name, "id": run_id, "resume": "allow"}}
    accelerator.init_trackers(cfg.log.project, config=_flat(cfg.to_dict()), init_kwargs=kwargs)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


class MetricsLog:
    """Append-only `metrics.jsonl`, one JSON object per log event, mirrored to the trackers.

    Each (split, step) record appears once, in step order, after any sequence of interruptions
    and resumes. On resume, records after the resumed step are dropped first (the resumed run
    writes them again), and so is a line cut short by a kill. A record of the resumed step itself
    may be logged again (an epoch's validation written before a kill, its checkpoint taken after
    the epoch's last step; a finished run resumed with `auto`): the new one replaces the old.
    """

    def __init__(self, accelerator, output_dir, resume_step: int | None = None):
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE
        self._resumed: set[tuple] = set()  # (split, step) records of the resumed step, replaced if logged again
        if accelerator.is_main_process:
            if resume_step is None:
                atomic_write_text(self.path, "")
            elif self.path.exists():
                kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
                atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
                self._resumed = {_key(r) for r in kept if r.get("step") == resume_step}

    def log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        clean = {k: _json_value(v) for k, v in record.items()}
        if _key(clean) in self._resumed:
            self._resumed.discard(_key(clean))
            others = [r for r in read_metrics(self.path) if _key(r) != _key(clean)]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in others))
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        split = record.get("split", "train")
        numeric = {
            (k if "/" in k else f"{split}/{k}"): v
            for k, v in clean.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self.accelerator.trackers:
            self.accelerator.log(numeric, step=int(record["step"]))


def _key(record: dict) -> tuple:
    return record.get("split", "train"), record.get("step")


def read_metrics(path: Path, warn=None) -> list[dict]:
    """The records of a metrics.jsonl. A line that is not a JSON object (cut short by a kill while it was
    written, not UTF-8, a bare value) is dropped; `warn(message)`, when given, hears of each but a cut last line."""
    out = []
    lines = path.read_bytes().splitlines()
    for number, raw in enumerate(lines, 1):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            if warn is not None and number < len(lines) and raw.strip():
                warn(f"{path}: line {number} skipped: not JSON ({str(exc).splitlines()[0][:80]})")
            continue
        if not isinstance(record, dict):
            if warn is not None:
                warn(f"{path}: line {number} skipped: a {type(record).__name__}, not a record")
            continue
        out.append(record)
    return out


def _json_value(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
