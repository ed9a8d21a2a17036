"""The final code's checks on every family the first sweep found exact: each must still prefill.

    python docs/results/families-s32/probe.py SUMMARY_TXT MODELS_DIR > docs/results/families-s32/probe.txt

verify.sh's first pass ran on the code before this session's checks (819d642); the checks
only refuse, so a family that was exact stays exact unless a check now refuses it. This runs each
such family's one-host prefill (`full`, 157 tokens) with the driver's and every host's checks.
"""

import sys
from pathlib import Path

from apb.config import MethodConfig
from apb.methods import build_method
from apb.model.features import check_supported
from apb.model.loading import check_attention_interface, load_model
from apb.parallel.comm import Comm
from apb.runtime.prefill import prefill
from apb.tools.verify import random_prompt


def main() -> None:
    summary, models = Path(sys.argv[1]), Path(sys.argv[2])
    exact = [line.split()[0] for line in summary.read_text().splitlines() if line.split()[1:2] == ["exact"]]
    refused = 0
    for name in exact:
        try:
            model = load_model(models / name)
            check_supported(model.config)
            check_attention_interface(model.config)
            prefill(model, random_prompt(157, 256, 0), build_method("full", MethodConfig()), Comm(None))
            print(f"{name:24s} prefills", flush=True)
        except Exception as e:
            refused += 1
            print(f"{name:24s} REFUSED {type(e).__name__}: {str(e)[:200]}", flush=True)
    print(f"\n{len(exact)} families exact in the first pass; {refused} refused by the final code")


if __name__ == "__main__":
    main()
