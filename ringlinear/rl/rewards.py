"""A user's reward, run where it cannot harm the trainer: its own Python process per completion,
killed after a time limit.

`SubprocessReward("checks.py:score")` is a reward callable like any other. Each call starts
`python -I` (no user site, no current folder on the path), loads `checks.py` from its path and
prints `score(problem, completion)`, where `problem` has the `prompt` and `answer` of the
`tasks.Problem`. A timeout, a crash or output that is not a number scores `failure`. The trainer
calls rewards from a thread pool, so several such processes run at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from .tasks import Problem

_RUNNER = """
import importlib.util, json, sys, types
spec = importlib.util.spec_from_file_location("user_reward", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
job = json.load(sys.stdin)
print(float(getattr(module, sys.argv[2])(types.SimpleNamespace(**job["problem"]), job["completion"])))
"""


class SubprocessReward:
    def __init__(self, spec: str, timeout: float = 10.0, failure: float = 0.0):
        """spec: 'FILE.py:FUNCTION'."""
        path, sep, name = spec.rpartition(":")
        if not sep or not path.endswith(".py") or not name.isidentifier():
            raise ValueError(f"a reward is given as FILE.py:FUNCTION, got {spec!r}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"no reward file {path}")
        self.path, self.name = str(Path(path).resolve()), name
        self.timeout, self.failure = timeout, failure

    def __call__(self, problem: Problem, completion: str) -> float:
        job = json.dumps({"problem": asdict(problem), "completion": completion})
        process = subprocess.Popen([sys.executable, "-I", "-c", _RUNNER, self.path, self.name], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   start_new_session=True)  # its own process group: children die with it
        try:
            out, _ = process.communicate(job, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return self.failure
        try:
            return float(out.strip().splitlines()[-1]) if process.returncode == 0 else self.failure
        except (ValueError, IndexError):
            return self.failure
