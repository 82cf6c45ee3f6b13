"""Starting: the scheduling pass, and each placed attempt's tasks sent to their agents.

``Starter`` asks ``mnp.sched.decide`` where the RUNNABLE jobs start, opens an
attempt for each, has the ``Launcher`` turn its placement into spawn messages and
registers and sends them (through ``Attempts``, one write per host per pass). A
multi-node attempt starts its main node first and the other nodes once the main
node runs (SPEC §6). A job whose launch fails ends alone (``Attempts.abort``).
"""

from __future__ import annotations

from typing import Any

from mnp.controller.attempts import Attempts
from mnp.controller.launch import Launcher
from mnp.controller.state import Shared
from mnp.jobs import Attempt, Job, TaskRun
from mnp.model import JobState
from mnp.sched.decide import Start, decide


class Starter:
    def __init__(self, shared: Shared, launcher: Launcher, attempts: Attempts) -> None:
        self.s = shared
        self.launcher = launcher
        self.attempts = attempts

    def schedule_pass(self) -> None:
        """Place what can start now, and start it."""
        s = self.s
        if not s.runnable:
            return
        starts = decide(
            s.runq.by_queue(),
            s.inventory.queues,
            s.inventory.compute_environments,
            s.hosts.capacity,
        )
        now = s.clock()
        arrays: dict[str, Job] = {}
        with self.attempts.batched():
            for start in starts:
                job = s.runnable[start.key]
                s.dequeue(job)
                try:
                    self._launch(job, start, now)
                except Exception as e:  # one job's failure never stops the pass
                    self.attempts.abort(job, e, start.grants)
                if job.parent is not None:
                    arrays[job.parent.id] = job.parent
            for parent in arrays.values():  # placed children make room for more
                self.attempts.admission.top_up(parent, now)

    def _launch(self, job: Job, start: Start, now: float) -> None:
        attempt = Attempt(len(job.attempts) + 1, ce=start.ce, grants=start.grants, placed_at=now)
        job.attempts.append(attempt)
        job.exit_code = job.signal = None
        job.set_state(JobState.STARTING, now)
        self.s.record_attempt(job, attempt)
        if job.is_multinode:
            self.s.spawn_bg(self._launch_multinode(job, attempt))
            return
        task, argv, env, _ = self.launcher.single(job, attempt, start.grants[0])
        if job.defn.secrets:  # read off the loop first; the task starts once they are here
            self.s.spawn_bg(self._launch_with_secrets(job, attempt, task, argv, env))
            return
        self._spawn(job, attempt, task, argv, env)

    async def _launch_with_secrets(
        self, job: Job, attempt: Attempt, task: TaskRun, argv: list[str], env: dict[str, str]
    ) -> None:
        try:
            attempt.secrets = await self.launcher.secrets(job.defn)
            if attempt.ending or job.attempt is not attempt:
                return  # terminated while the secrets were read
            self._spawn(job, attempt, task, argv, env)
        except Exception as e:
            self.attempts.abort(job, e)

    def _spawn(
        self,
        job: Job,
        attempt: Attempt,
        task: TaskRun,
        argv: list[str],
        env: dict[str, str],
        files: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Start a task; False when it cannot start, and its attempt is ending."""
        s = self.s
        if s.on_task_start is not None:
            why = s.on_task_start(job, task)
            if why is not None:
                self.attempts.begin_end(job, attempt, JobState.FAILED, why, s.clock())
                return False
        env.update(attempt.secrets)
        world = attempt.mpi
        rank = None
        if world is not None and task.node_index is not None:
            rank = world.rank_of(task.node_index, task.task_index)
            if rank is not None:  # an MPI rank: the agent serves it PMI (PROTOCOL.md)
                env.update(world.rank_env(rank))
        msg: dict[str, Any] = {
            "op": "spawn",
            "tid": task.tid,
            "argv": argv,
            "env": env,
            "cwd": job.defn.cwd,
        }
        if job.defn.python_env not in (None, "none"):
            msg["pyenv"] = job.defn.python_env
        if files:
            msg["files"] = files
        container = self.launcher.container(job, task, env)
        if container is not None:
            msg["container"] = container
        if world is not None and rank is not None:
            msg["pmi"] = world.rank_part(rank)
        launch = attempt.launch
        if attempt.port_key and launch is not None and launch.master_port is None:
            # the main node's tasks: its agent picks MASTER_PORT (Launcher.nodes)
            msg["port_env"], msg["port_key"] = "MASTER_PORT", attempt.port_key
        # registered only now: nothing above may leave a task that was never sent
        attempt.tasks[task.tid] = task
        s.tasks[task.tid] = (job, attempt, task)
        return self.attempts.send_spawn(task, msg)

    async def _launch_multinode(self, job: Job, attempt: Attempt) -> None:
        try:
            await self._launch_nodes(job, attempt)
        except Exception as e:  # fails this job only
            self.attempts.abort(job, e)

    async def _launch_nodes(self, job: Job, attempt: Attempt) -> None:
        """The main node first (SPEC §6); the others once it runs (``main_running``)."""
        if not await self.launcher.nodes(job, attempt):
            return
        mn = job.defn.multinode
        assert mn is not None
        self._start_node(job, attempt, mn.main_node)
        if attempt.nodes[mn.main_node].held:
            self.main_running(job, attempt, self.s.clock())

    def _start_node(self, job: Job, attempt: Attempt, index: int) -> None:
        node = attempt.nodes[index]
        if node.held:
            node.set_state(JobState.RUNNING, self.s.clock())
            return
        for task, argv, env, files in self.launcher.node(job, attempt, node):
            node.tasks.append(task)
            if not self._spawn(job, attempt, task, argv, env, files):
                return

    def main_running(self, job: Job, attempt: Attempt, now: float) -> None:
        """A multi-node attempt's main node runs: the job is RUNNING, its timer starts,
        and the other nodes are started."""
        mn = job.defn.multinode
        assert mn is not None and attempt.launch is not None
        job.set_state(JobState.RUNNING, now)
        self.attempts.arm_timeout(job, attempt)
        for node in attempt.nodes:
            if attempt.ending:
                return
            if node.index != mn.main_node:
                self._start_node(job, attempt, node.index)
        self.attempts.check_all_running(attempt, now)
