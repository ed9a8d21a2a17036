# Session 28: the CPU time a gloo collective costs each of 8 processes sharing 2 cores, beside
# compute (150 matmuls of 256x256 per iteration, one thread): none, a broadcast of 516 KB (apb:shared's
# anchor at SmolLM2's shape, 8K, W=8) and an all-gather of 137 KB from each (the split's shares).
# Run: .venv/bin/python docs/results/bench13/gloo_cpu_s28.py > docs/results/bench13/gloo_cpu_s28.txt
NMM = 150
import os, sys, time, torch, torch.distributed as dist, torch.multiprocessing as mp

def work(rank, world, port, op, nbytes, iters, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    t = torch.ones(nbytes // 4)
    a = torch.randn(256, 256)
    def compute():
        for _ in range(NMM): a @ a
    # warm
    for _ in range(3):
        if op != "none":
            out = [torch.empty_like(t) for _ in range(world)]
            w = dist.all_gather(out, t, async_op=True) if op == "ag" else dist.broadcast(t, 0, async_op=True)
            w.wait()
    dist.barrier()
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(iters):
        if op == "ag":
            out = [torch.empty_like(t) for _ in range(world)]
            w = dist.all_gather(out, t, async_op=True)
        elif op == "bc":
            w = dist.broadcast(t, 0, async_op=True)
        compute()
        if op != "none": w.wait()
    q.put((rank, time.process_time() - c0, time.perf_counter() - w0))
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    world, iters = 8, 20
    for op, nb in [("none", 0), ("bc", 516_000), ("ag", 137_000)]:
        if op == "ag2": continue
        q = mp.get_context("spawn").SimpleQueue()
        ps = [mp.get_context("spawn").Process(target=work, args=(r, world, 29511 + hash(op + str(nb)) % 1000, op, max(nb, 4), iters, q)) for r in range(world)]
        [p.start() for p in ps]; [p.join() for p in ps]
        res = sorted(q.get() for _ in range(world))
        print(op, nb, "cpu ms/iter per rank", [round(c / iters * 1e3, 2) for _, c, _ in res], "wall ms/iter", round(max(w for *_, w in res) / iters * 1e3, 2), flush=True)
