"""``python -m apb.tools.retrieval``: train the retrieval model, measure a saved one, or plot its curve.

Every default is the shipped run's setting (docs/training.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from apb.tools import retrieval
from apb.tools.retrieval.evaluate import record_final_eval
from apb.tools.retrieval.plots import plot_curve
from apb.tools.retrieval.train import train


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m apb.tools.retrieval", description=retrieval.__doc__.split("\n")[0])
    p.add_argument("--out", default="apb/data/retrieval-model")
    p.add_argument("--ckpt", default="/tmp/apb-retrieval-ckpt")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=3072)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--rope-theta", type=float, default=1e8)
    p.add_argument("--prev-heads", type=int, default=6, help="layer-0 heads initialised as previous-token heads")
    p.add_argument("--induction-heads", default="0,1,2,3,7", help="layer-1 heads initialised as induction heads")
    p.add_argument("--same-token-heads", default="6", help="layer-1 heads initialised to match the current token")
    p.add_argument("--copy-back", default="6:2,7:3",
                   help="layer-1 head:offset-head pairs that copy the token that offset head saw (see init_feature_heads)")
    p.add_argument("--feature-heads", type=int, default=1,
                   help="1: token-copying value/output paths for the offset heads and layer 1 (see init_feature_heads)")
    p.add_argument("--prev-offsets", default="1,2,3,4,5,6", help="how far back each of those heads looks")
    p.add_argument("--prev-scale", type=float, default=5.0, help="q/k bias magnitude of those heads")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lm-weight", type=float, default=0.0,
                   help="weight of an auxiliary next-token loss on the non-answer tokens (0: answers only)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--stages", default="160:32:500,512:16:250,1024:8:150,2048:4:120,4096:2:120",
                   help="LEN:BATCH:MAX_STEPS,... (short to long; the last runs to its step count)")
    p.add_argument("--advance-at", type=float, default=0.9, help="passkey and niah accuracy to move on")
    p.add_argument("--advance-at-vt", type=float, default=0.5, help="vt accuracy to move on")
    p.add_argument("--needle-fraction", type=float, default=0.6)
    p.add_argument("--dense-until", type=int, default=160, help="stages up to this length are needles only (no haystack)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-n", type=int, default=32)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--eval-only", default=None, help="measure a saved model directory instead of training")
    p.add_argument("--eval-lengths", default="4096")
    p.add_argument("--eval-final-n", type=int, default=100)
    p.add_argument("--plot-curve", nargs=2, metavar=("TRAINING_LOG", "PNG"), help="plot a saved learning curve")
    args = p.parse_args(argv)
    if args.plot_curve:
        plot_curve(Path(args.plot_curve[0]), Path(args.plot_curve[1]))
        return
    if args.eval_only:
        torch.set_num_threads(args.threads)
        record_final_eval(Path(args.eval_only), [int(x) for x in args.eval_lengths.split(",")], args.eval_final_n,
                          args.seed)
        return
    train(args)


if __name__ == "__main__":
    main()
