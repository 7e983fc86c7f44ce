"""Stop requests: signals that only set a flag, and a stop file every rank polls.

    watcher = StopWatcher(cfg.output_dir).install()
    ...  # at the step boundaries where the ranks agree (the loop picks them):
    if any_rank(watcher.requested()):
        save a checkpoint; write preempted.json; watcher.clear(); sys.exit(EXIT_PREEMPTED)
    ...
    watcher.uninstall()

Two ways to ask a run to stop, because a signal rarely reaches every rank by itself:

- A signal to this process: SIGUSR1, SIGUSR2, SIGTERM or SIGINT (Ctrl-C). The handler only sets
  a flag (doing work inside a handler is fragile, docs/pitfalls.md, "Work inside a signal handler"); the loop checkpoints at the next
  step boundary. A second SIGINT raises KeyboardInterrupt at once, like Ctrl-C twice.
- The stop file `<output_dir>/.stop`. Measured with torch 2.14 / accelerate 1.15: torchrun
  (`accelerate launch --multi_gpu`) forwards SIGTERM and SIGINT to its workers but then kills
  them after 30 s, and SIGUSR1/USR2 kill torchrun itself and orphan the workers; the
  single-process `accelerate launch` dies on all four and orphans its one worker. Under SLURM the
  warning signal goes to the batch shell, not to the ranks. So the SLURM templates trap the
  signal in the shell and touch this file on the shared filesystem; every rank looks for it at
  each step boundary where the ranks agree, and `any_rank` makes them agree.
  `touch <output_dir>/.stop` also stops a run by hand.

Nothing here knows about ranks: each process watches for itself.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

EXIT_PREEMPTED = 75
"""Exit status of a run that stopped on request after saving a checkpoint (sysexits' EX_TEMPFAIL:
try again later). Launchers may turn it into 1 (torchrun does), so the SLURM templates look for
`PREEMPTED_FILE` instead of trusting the status."""

STOP_FILE = ".stop"
"""Name of the stop file inside the output folder."""

PREEMPTED_FILE = "preempted.json"
"""Written by the main process after the stop checkpoint; the SLURM templates requeue on it."""

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class StopWatcher:
    """Notices stop requests for one run; `requested()` costs one `stat` of the stop file."""

    def __init__(self, output_dir):
        self.stop_file = Path(output_dir) / STOP_FILE
        self.signal: signal.Signals | None = None
        self._file_seen = False
        self._sigints = 0
        self._previous: dict = {}

    # ---------------------------------------------------------------- handlers
    def _handle(self, signum, frame) -> None:
        # Only flags: the loop does the saving at a step boundary.
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:
                raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signal.Signals(signum)

    def install(self) -> StopWatcher:
        """Route SIGUSR1/USR2/TERM/INT to the flag. A no-op off the main thread (Python only
        delivers signals there) and when already installed."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Give the signals back to the handlers that were there before `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> StopWatcher:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # ---------------------------------------------------------------- queries
    def requested(self) -> bool:
        """True once a signal arrived in this process or the stop file was seen.

        Every call looks at the stop file (one `stat`), so a file that exists before a call is
        always seen by that call: no clock decides whether a request is noticed at a given step.
        The loop decides how often to ask, at the step boundaries where the ranks agree, and so
        how often a (possibly network) filesystem is touched.
        """
        if self.signal is None and not self._file_seen:
            self._file_seen = self.stop_file.exists()
        return self.signal is not None or self._file_seen

    @property
    def reason(self) -> str | None:
        """What asked for the stop, for the log line: `SIGTERM`, `stop file <path>`, or None."""
        if self.signal is not None:
            return self.signal.name
        if self._file_seen:
            return f"stop file {self.stop_file}"
        return None

    def clear(self) -> None:
        """Remove the stop file (main process, once the stop is honoured or the run finished),
        so the next run of this output folder does not stop at its first step."""
        self.stop_file.unlink(missing_ok=True)
