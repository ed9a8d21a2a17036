"""Process groups, collectives, layouts and worker groups (installed as ``apb.parallel``).

``layout`` is pure; ``comm``, ``rendezvous`` and ``state`` talk to torch.distributed; the
worker groups (local processes, Ray actors) start and supervise the hosts.
"""
