"""Process groups, collectives, layouts and worker groups (installed as ``apb.parallel``).

``layout`` is pure; ``comm``, ``rendezvous`` and ``state`` talk to torch.distributed; the
worker groups (``local_group``: local processes, ``ray_group``: Ray actors, ``torchrun_group``:
the processes torchrun started) start and supervise the hosts.
"""
