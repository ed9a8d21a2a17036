"""The calibration behind apb.tools.verify.HalfRule: errors against the float32 eager reference of
eager bfloat16, of the exact methods, and of four deliberately wrong masks (in-process, W=1).
Run: .venv/bin/python docs/results/verify-bf16/calibrate.py smollm2-135m-instruct 700 3"""
import torch, sys, importlib
from apb.model.catalog import resolve_model
from apb.model.loading import load_model
from apb.parallel.groups.local import LocalWorkerGroup
from apb.parallel.comm import Comm, CommStats
from apb.runtime.prefill import prefill
from apb.methods import build_method
from apb.config import MethodConfig
from apb.runtime.worker import PromptRequest
from apb.runtime.decode import Sampling
from apb.tools.verify import reference_run, random_prompt, kl_divergence
A = importlib.import_module("apb.kernels.attention")
def meas(tag, truth, logits, keys, values):
    def layer_rel(m, w):
        d = (m.float() - w.float()).flatten(1).norm(dim=1); r = w.float().flatten(1).norm(dim=1)
        return (d / r).max().item()
    def tok(m, w):
        d = (m.float() - w.float()).transpose(1, 2).flatten(2).norm(dim=-1)
        r = w.float().transpose(1, 2).flatten(2).norm(dim=-1)
        rel = d / torch.maximum(r, r.median(dim=1, keepdim=True).values)
        return rel.max().item(), torch.quantile(rel.flatten(), 0.99).item()
    print(f"{tag:18s} layerK {layer_rel(keys, truth.keys):.4f} layerV {layer_rel(values, truth.values):.4f} tokK %.3f/%.3f tokV %.3f/%.3f" % (*tok(keys, truth.keys), *tok(values, truth.values)), "KL %.2e" % kl_divergence(truth.logits, logits.float()))
def main():
    name, n, W = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    path = resolve_model(name)
    ids = random_prompt(n, 49152 if 'smol' in name else 256, n)
    truth = reference_run(load_model(path, "float32", attn_implementation="eager"), ids, 1)
    eager = reference_run(load_model(path, "bfloat16", attn_implementation="eager"), ids, 1)
    meas("eager-bf16", truth, eager.logits, eager.keys, eager.values)
    model = load_model(path, "bfloat16")
    full_fn = importlib.import_module("apb.methods.full")
    orig = A.attention
    def nextkey(q, k, v, causal=True, *a, **kw):
        if causal and k.shape[2] == q.shape[2] and k.shape[2] > 1:
            out, lse = orig(q[:, :, :-1], k, v, causal=True, *a, **kw)
            last, l2 = orig(q[:, :, -1:], k, v, causal=False, *a, **kw)
            return torch.cat([out, last], 2), torch.cat([lse, l2], 2)
        return orig(q, k, v, causal, *a, **kw)
    def nokey0(q, k, v, causal=True, *a, **kw):
        if causal and k.shape[2] == q.shape[2] and k.shape[2] > 1:
            o, l = orig(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], causal=True, *a, **kw)
            o0, l0 = orig(q[:, :, :1], k[:, :, :1], v[:, :, :1], causal=True, *a, **kw)
            return torch.cat([o0, o], 2), torch.cat([l0, l], 2)
        return orig(q, k, v, causal, *a, **kw)
    def lastloses(q, k, v, causal=True, *a, **kw):
        if causal and k.shape[2] == q.shape[2] and k.shape[2] > 1:
            return orig(q, k, v, causal=True, *a, window=k.shape[2]-1, **kw)
        return orig(q, k, v, causal, *a, **kw)
    def midloses(q, k, v, causal=True, *a, **kw):   # window n/2: later half loses the first keys
        if causal and k.shape[2] == q.shape[2] and k.shape[2] > 1:
            return orig(q, k, v, causal=True, *a, window=k.shape[2]*3//4, **kw)
        return orig(q, k, v, causal, *a, **kw)
    for tag, fn in [("full-W1", orig), ("wrong next-key", nextkey), ("wrong no-key0", nokey0), ("wrong last-loses0", lastloses), ("wrong window3/4", midloses)]:
        full_fn.attention = fn
        res = prefill(model, ids, build_method("full", MethodConfig()), Comm(None, CommStats()))
        meas(tag, truth, res.last_logits, res.cache.keys, res.cache.values)
    full_fn.attention = orig
    with LocalWorkerGroup(W, worker_kwargs={"device": "cpu", "timeout_s": 300, "threads": 1}, timeout_s=600) as g:
        for m in ["ring", "ulysses", "apb:uncompressed"]:
            res = [r for r in g.call("run_prompt", PromptRequest(str(path), ids, m, n_query=32, dtype="bfloat16", return_cache=True, sampling=Sampling(max_new_tokens=1))) if r.rank == 0][0]
            meas(f"{m}-W{W}", truth, res.last_logits, res.cache.keys, res.cache.values)
if __name__ == "__main__":
    main()
