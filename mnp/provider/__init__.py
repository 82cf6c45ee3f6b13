"""Providers: where a MANAGED compute environment acquires capacity (issue 15).

``mnp.provider.<name>`` holds the I/O of one batch system: submit an allocation that
holds nodes, poll the state of the allocations it submitted, cancel one. The decisions
(when, how large) are ``mnp.sched.autoscale``'s; starting agents on the nodes is the
transport's (``srun --jobid=ALLOCATION`` for Slurm, SSH for ``command``); the controller's
pass is ``mnp.controller.managed``.
"""
