"""Process groups, collectives, layouts and worker groups (installed as ``apb.parallel``).

``layout`` is pure; ``comm``, ``rendezvous`` and ``state`` talk to torch.distributed; the
worker groups in ``groups/`` (``local``: local processes, ``ray``: Ray actors, ``torchrun``:
the processes torchrun started) start and supervise the hosts behind one ``WorkerGroup``
protocol.
"""
