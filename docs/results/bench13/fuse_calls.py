# Session 22: spava one layer on one host (bench-attn shape, W=8 32K: anchor 512, blocks of 2,014,
# passing parts of 256 from 5 and 9 other blocks), float32, one thread: its calls as they are against
# one causal call over [anchor; block 1; block 2] plus the two passing calls (what the rows before a
# block are is exactly what that causal call gives it). Best of 5, two rounds.
# Run: .venv/bin/python docs/results/bench13/fuse_calls.py > docs/results/bench13/fuse_calls.txt
import time

import torch
from apb.kernels import attention, merge_many
torch.set_num_threads(1)
H, D = 4, 64
a, v = 512, 2014
g = torch.Generator().manual_seed(0)
n = a + 2*v
q, k, vv = (torch.randn(1, H, n, D, generator=g) for _ in range(3))
P1, P2 = 5*256, 9*256
pk, pv = torch.randn(1, H, P2, D), torch.randn(1, H, P2, D)
A, R1, R2 = slice(0, a), slice(a, a+v), slice(a+v, n)
def best(f, r=5):
    f(); ts=[]
    for _ in range(r):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return min(ts)
def current():
    attention(q[:,:,A],k[:,:,A],vv[:,:,A],causal=True)
    o1=attention(q[:,:,R1],k[:,:,R1],vv[:,:,R1],causal=True)
    o2=attention(q[:,:,R2],k[:,:,R2],vv[:,:,R2],causal=True)
    k1=torch.cat([pk[:,:,:P1],k[:,:,A]],2); v1=torch.cat([pv[:,:,:P1],vv[:,:,A]],2)
    p1=attention(q[:,:,R1],k1,v1,causal=False)
    k2=torch.cat([pk,k[:,:,:a+v]],2); v2=torch.cat([pv,vv[:,:,:a+v]],2)
    p2=attention(q[:,:,R2],k2,v2,causal=False)
    merge_many([o1,p1]); merge_many([o2,p2])
def fused():
    o=attention(q,k,vv,causal=True)
    p1=attention(q[:,:,R1],pk[:,:,:P1],pv[:,:,:P1],causal=False)
    p2=attention(q[:,:,R2],pk,pv,causal=False)
    merge_many([(o[0][:,:,R1],o[1][:,:,R1]),p1]); merge_many([(o[0][:,:,R2],o[1][:,:,R2]),p2])
for _ in range(2):
    print(f"as now {best(current):.4f} s, fused {best(fused):.4f} s")
