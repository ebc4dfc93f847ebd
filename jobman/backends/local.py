"""The local backend: jobs run as real processes on this machine, each under its own
`jobman.runner`, which honours dependencies, array limits, retries and cancels by itself."""

from __future__ import annotations

import shlex
from typing import Any, Optional

from jobman.accelerators import parse_accelerator
from jobman.backends import Backend
from jobman.errors import UsageError


class LocalBackend(Backend):
    name = "local"

    def validate(self, spec: Any) -> None:
        acc = parse_accelerator(spec.accelerator)
        if acc is not None and acc.is_tpu:
            raise UsageError("the local backend cannot provide TPU %s; use --backend skypilot" % acc)
        if spec.nodes and spec.nodes > 1:
            raise UsageError("the local backend runs on one node; --nodes %d needs skypilot or slurm" % spec.nodes)
        if spec.image:
            raise UsageError("the local backend does not run containers; --image needs skypilot or slurm")

    def render(self, spec: Any, job_id: int = 0, array_task: Optional[int] = None) -> str:
        if spec.script is not None:
            return "# script %s, run as: %s\n%s" % (spec.script_name, shlex.join(["<script>"] + spec.argv[1:]),
                                                    spec.script)
        return shlex.join(spec.argv) + "\n"
