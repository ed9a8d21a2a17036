"""Every family preset, exact under every exact method at W = 2 and 4, both decode modes (W = 3:
the `apb verify` run in docs/methods.md; W = 1 is the one-host path).

The presets (``apb/model/loading.py``) are tiny random models of today's families, each with its
distinguishing feature (sliding windows of 64 tokens, softcap, sinks, longrope past its original
512 positions, NoPE layers, MLA); the prompt (601 tokens, odd) is longer than every window and
crosses phi3's original length. Compared with one eager transformers forward and ``generate``
(logits, whole KV cache, greedy tokens) to 1e-4 in float32.
"""

import pytest

from apb.model.loading import materialize_preset
from apb.parallel.groups.local import LocalWorkerGroup
from test_model_features import assert_exact, run_methods

FAMILIES = ["tiny-qwen3", "tiny-mistral-sliding", "tiny-gemma2", "tiny-gemma3", "tiny-gpt-oss", "tiny-phi3",
            "tiny-smollm3", "tiny-deepseek-v3"]
EXACT = ["full", "ring", "ulysses", "apb:uncompressed", "spava:uncompressed"]
# (W, decode modes): each preset meets both modes at W > 1
SETTINGS = [(2, ("gather", "distributed")), (4, ("distributed",))]


@pytest.mark.parametrize("world,modes", SETTINGS, ids=[f"W{w}" for w, _ in SETTINGS])
def test_every_family_is_exact(world, modes):
    with LocalWorkerGroup(world, worker_kwargs={"device": "cpu", "timeout_s": 120}, timeout_s=300) as group:
        for preset in FAMILIES:
            path = materialize_preset(preset)
            for mode in modes:
                _, _, rows = run_methods(group, path, 601, EXACT, decode_mode=mode, n_query=23)
                assert_exact(rows, f"{preset} W={world} {mode}")
