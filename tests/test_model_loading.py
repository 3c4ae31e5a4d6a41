"""Building models from several threads at once (an in-process simulation, a server's evaluator beside a client)
leaves transformers' weight tying intact: fedllm.adapter's lock around every load."""

from __future__ import annotations

import threading
from pathlib import Path

from transformers import PreTrainedModel

from fedllm.adapter import load_causal_lm
from fedllm.tiny import build_tiny_gpt2


def test_concurrent_loads_leave_weight_tying_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Unlocked, four threads in from_pretrained leave PreTrainedModel.tie_weights as a no-op for the process
    # (5 of 5 tries when this test was written): transformers swaps it class-wide while each load runs.
    original = PreTrainedModel.tie_weights
    threads = [threading.Thread(target=load_causal_lm, args=(tiny_model_dir,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert PreTrainedModel.tie_weights is original
    gpt2 = load_causal_lm(build_tiny_gpt2(tmp_path / "gpt2", num_hidden_layers=1))
    assert gpt2.lm_head.weight.data_ptr() == gpt2.transformer.wte.weight.data_ptr()
