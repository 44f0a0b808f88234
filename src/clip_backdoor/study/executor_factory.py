"""The executor a study's ``run.executor`` names: the local pool (``executors.py``), SLURM
(``slurm.py``) or Ray (``ray_tasks.py``). It sits above all three, which share the interface in
``executors.py`` and never import this module.
"""

from __future__ import annotations

from clip_backdoor.errors import UserError
from clip_backdoor.study.executor_settings import EXECUTORS, parse_ray, parse_slurm
from clip_backdoor.study.executors import Executor, InProcess, WorkerPool, local_executor
from clip_backdoor.study.expand import StudyPlan
from clip_backdoor.study.ray_tasks import RayExecutor
from clip_backdoor.study.slurm import SlurmExecutor
from clip_backdoor.study.spec import StudySpec


def make_executor(spec: StudySpec, plan: StudyPlan, *, jobs: int, devices: list[str],
                  dry_run: bool = False) -> Executor:
    """The executor ``run.executor`` names, checked against the study directory it must share."""
    name = spec.run.executor
    if name == "local":
        if dry_run:  # describes, starts no process
            pool = InProcess() if jobs <= 1 and not devices else _DescribedPool(jobs, devices)
            return pool
        return local_executor(jobs, devices)
    if name == "slurm":
        return SlurmExecutor(parse_slurm(spec.run.slurm), plan, dry_run=dry_run)
    if name == "ray":
        return RayExecutor(parse_ray(spec.run.ray), plan, dry_run=dry_run)
    raise UserError(f"run.executor: {name!r} is not one of {', '.join(EXECUTORS)}")


class _DescribedPool(WorkerPool):
    def __init__(self, jobs: int, devices: list[str]):  # no processes: --dry-run only describes
        self.capacity, self.devices = jobs, devices
