"""Ray job entry: the batch job on a Ray cluster, one worker actor per GPU.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python launch/ray_job.py --config configs/llama3.1-8b-128k-apb.yaml --input in.jsonl --output out.jsonl

Inside a submitted job Ray is already reachable, so ``ray.address`` defaults to ``auto`` here.
"""

import argparse
import sys

from apb.cli import main as apb_main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="launch/ray_job.py")
    ap.add_argument("--config", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--address", default="auto", help="Ray address; 'auto' joins the job's cluster")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    sets = [f"ray.address={args.address}", *args.overrides]
    cmd = ["run", "--config", args.config, "--input", args.input, "--output", args.output, "--launcher", "ray"]
    for item in sets:
        cmd += ["--set", item]
    return apb_main(cmd)


if __name__ == "__main__":
    sys.exit(main())
