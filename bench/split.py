"""Benchmark: split learning (``--fed_mode split``) at Llama-2-7B shape and on real small models.

1. Bytes per training step per client, Llama-2-7B shape, p = q = 2, batch 4, 512 tokens: the four messages of a
   step (h_A + mask info up, h_B down, ∂loss/∂h_B up, ∂loss/∂h_A down) encoded exactly as the client and server
   encode them (``fedllm.split.messages``), bf16 and fp32 -- against the baseline of the same run, federated LoRA's
   bytes per client per round (the r16 q,v adapter down and its delta up).
2. Server time per step: one 7B-shaped decoder block with LoRA (random weights, fp32, CPU), forward and backward
   at a measured batch, scaled to the middle's 28 blocks and to batch 4 × 512 (linear in tokens: the attention
   term, quadratic in T, is ~6 % of a 7B block's FLOPs at T = 512). An extrapolation; the number a GPU gives is
   far lower -- what matters here is that it is the server's, not the client's.
3. Client memory: peak RSS of a client holding the ends (embedding, blocks[0:2], blocks[N-2:N], norm, LM head)
   and running one split step, against one holding the full model and running one LoRA step on the same batch,
   for the tiny Llama (4 layers, p = q = 1) and a 51M Llama (10 layers, p = q = 2); and the 7B shape's parameter
   counts from the meta device.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .common import (
    LLAMA2_7B,
    QV_7B,
    Table,
    Target,
    benchmark_main,
    proc_status,
    reset_peak_rss,
    run_forked,
    write_results,
)

NAME = "split"
TITLE = "Split learning: bytes per step, server time per step, client memory (FL-LLaMA)"
BATCH, TOKENS, HEAD, TAIL = 4, 512, 2, 2


def message_bytes(wire_dtype: str, batch: int, tokens: int, hidden: int) -> dict[str, int]:
    import torch

    from fedllm.split.messages import encode_forward, encode_tensor
    from fedllm.split.model import MaskInfo

    hidden_states = torch.zeros(batch, tokens, hidden)
    mask = MaskInfo.from_attention_mask(torch.ones(batch, tokens, dtype=torch.long))
    forward = len(encode_forward(hidden_states, mask, wire_dtype))
    tensor = len(encode_tensor("hidden", hidden_states, wire_dtype))
    return {"forward request": forward, "forward answer": tensor, "backward request": tensor,
            "backward answer": tensor}


def chunked_bytes(wire_dtype: str, batch: int, tokens: int, hidden: int, chunk: int) -> dict[str, int]:
    """--split_sequence_chunk: the bytes of one step's four messages as chunks (the answers framed), the requests
    per step and the largest body."""
    import torch

    from fedllm.split.chunks import encode_chunks, frame
    from fedllm.split.model import MaskInfo

    hidden_states = torch.zeros(batch, tokens, hidden)
    mask = MaskInfo.from_attention_mask(torch.ones(batch, tokens, dtype=torch.long))
    forward = encode_chunks({"hidden": hidden_states, **mask.tensors()}, chunk, wire_dtype, "forward", "c", 1, 1)
    grad = encode_chunks({"grad": hidden_states}, chunk, wire_dtype, "backward", "c", 1, 1)
    answer = frame(encode_chunks({"hidden": hidden_states}, chunk, wire_dtype, "forward answer", "c", 1, 1))
    return {"per step": sum(map(len, forward)) + 2 * len(answer) + sum(map(len, grad)),
            "requests": len(forward) + len(grad), "largest request body": max(map(len, forward))}


def seven_b_config(layers: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA2_7B, **({"num_hidden_layers": layers} if layers else {})})


def block_seconds(batch: int, tokens: int, repeat: int) -> float:
    """Median seconds of forward + backward of one 7B-shaped block with r16 q,v LoRA, in this process."""
    import statistics

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from fedllm.split.model import MaskInfo, run_blocks

    torch.manual_seed(0)
    config = seven_b_config(layers=1)
    config.vocab_size = 256  # the block is what is timed; a small vocabulary keeps the rest small
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    mask = MaskInfo.from_attention_mask(torch.ones(batch, tokens, dtype=torch.long))
    times = []
    for _ in range(repeat + 1):  # the first is a warm-up
        hidden = torch.randn(batch, tokens, config.hidden_size, requires_grad=True)
        started = time.perf_counter()
        out = run_blocks(model, hidden, range(0, 1), mask.attention_mask(), mask.position_ids)
        out.backward(torch.ones_like(out))
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def middle_peak_rss(model_dir: str, layers: tuple[int, int], tokens: int) -> dict[str, float]:
    """Peak RSS (MiB) of the server building the middle and running one middle step (forked child)."""
    import torch

    from fedllm.adapter import build_lora_config, load_model_config
    from fedllm.split.model import SERVER_PARTS, MaskInfo, SplitPlan, build_part_model
    from fedllm.split.step import SplitMiddle

    torch.set_num_threads(1)
    reset_peak_rss()
    config = load_model_config(model_dir)
    lora = build_lora_config(config, r=8, alpha=16, dropout=0.0, target_modules=None)
    plan = SplitPlan.of(config, *layers)
    middle = SplitMiddle(build_part_model(model_dir, config, plan, SERVER_PARTS, lora), plan, 1e-3)
    hidden = torch.randn(BATCH, tokens, config.hidden_size)
    leaf, out = middle.forward(hidden, MaskInfo.from_attention_mask(torch.ones(BATCH, tokens, dtype=torch.long)))
    middle.backward(leaf, out, torch.ones_like(out))
    return {"peak_mib": proc_status()["VmHWM"] / (1 << 20)}


def peak_rss(model_dir: str, layers: tuple[int, int], split: bool, tokens: int) -> dict[str, float]:
    """Peak RSS (MiB) of building the client's model and running one training step (forked child)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from fedllm.adapter import build_lora_config, load_model_config
    from fedllm.split.model import CLIENT_PARTS, SplitPlan, build_part_model
    from fedllm.split.step import Batch, SplitEnds

    torch.set_num_threads(1)
    reset_peak_rss()
    before = proc_status()["VmRSS"]
    config = load_model_config(model_dir)
    lora = build_lora_config(config, r=8, alpha=16, dropout=0.0, target_modules=None)
    ids = torch.randint(4, config.vocab_size, (BATCH, tokens))
    batch = Batch(ids, torch.ones_like(ids), ids.clone())
    if split:
        plan = SplitPlan.of(config, *layers)
        ends = SplitEnds(build_part_model(model_dir, config, plan, CLIENT_PARTS, lora), plan, 1e-3)
        hidden_a, _mask = ends.head(batch)
        _loss, _grad_b = ends.tail(hidden_a, batch.labels)  # h_B of the right shape; the middle is not here
        ends.head_backward(torch.zeros_like(hidden_a))
    else:
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    status = proc_status()
    return {"peak_mib": status["VmHWM"] / (1 << 20), "baseline_mib": before / (1 << 20)}


def build_51m(directory: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=640, intermediate_size=1728, num_hidden_layers=10,
                         num_attention_heads=10, num_key_value_heads=10, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def part_parameters(config, plan) -> dict[str, int]:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counts = {"head": 0, "middle": 0, "tail": 0}
    for name, param in model.named_parameters():
        counts[plan.part_of(name)] += param.numel()
    return counts


def build_models(directory: str, quick: bool) -> list[tuple[str, str, tuple[int, int], int]]:
    """The tiny Llama (4 layers) and, unless quick, the 51M Llama: (label, path, (p, q), tokens) each."""
    from fedllm.tiny import build_tiny_llama

    tiny = build_tiny_llama(Path(directory) / "tiny4", num_hidden_layers=4)
    cases = [("tiny Llama (4 layers)", str(tiny), (1, 1), 64)]
    if not quick:
        cases.append(("51M Llama (10 layers)", str(build_51m(Path(directory) / "llama51m", tiny)), (2, 2), 128))
    return cases


def run(out_dir: Path, quick: bool) -> bool:
    import tempfile

    # Every torch computation runs in a forked child first: a child forked after the parent's torch thread pool
    # started can hang. The parent computes only afterwards (message sizes, parameter counts).
    measured_batch, measured_tokens = (1, 32) if quick else (1, 128)
    seconds = run_forked(block_seconds, measured_batch, measured_tokens, 1 if quick else 3)
    memory_rows, ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cases = run_forked(build_models, tmp, quick)
        for label, path, layers, tokens in cases:
            split = run_forked(peak_rss, path, layers, True, tokens)
            full = run_forked(peak_rss, path, layers, False, tokens)
            server = run_forked(middle_peak_rss, path, layers, tokens)
            memory_rows.append((label, path, layers, split, full, server))
        from fedllm.adapter import load_model_config
        from fedllm.split.model import SplitPlan

        memory_table = Table("Client memory: the ends vs the full model", [
            "model", "split", "client parameters", "of the full model", "peak RSS split MiB", "peak RSS full MiB",
            "split / full", "server (middle) peak RSS MiB"])
        plan = SplitPlan.of(seven_b_config(), HEAD, TAIL)
        counts = part_parameters(seven_b_config(), plan)
        total = sum(counts.values())
        memory_table.rows.append(["Llama-2-7B shape (meta device)", "p = q = 2",
                                  f"{(counts['head'] + counts['tail']) / 1e9:.2f}B",
                                  f"{(counts['head'] + counts['tail']) / total:.1%}", float("nan"), float("nan"),
                                  float("nan"), float("nan")])
        for label, path, layers, split, full, server in memory_rows:
            config = load_model_config(path)
            part = part_parameters(config, SplitPlan.of(config, *layers))
            held = (part["head"] + part["tail"]) / sum(part.values())
            ratios.append(split["peak_mib"] / full["peak_mib"])
            memory_table.rows.append([label, f"p = {layers[0]}, q = {layers[1]}",
                                      f"{(part['head'] + part['tail']) / 1e6:.1f}M", f"{held:.1%}",
                                      split["peak_mib"], full["peak_mib"], ratios[-1], server["peak_mib"]])

    hidden = LLAMA2_7B["hidden_size"]
    bytes_table = Table(f"Bytes per split step per client, 7B shape (hidden {hidden}), batch {BATCH} × {TOKENS} "
                        "tokens", ["wire dtype", "forward up", "forward down", "backward up", "backward down",
                                   "per step MiB", f"10 steps vs one FL LoRA round ({QV_7B.label}, bf16)"])
    lora_round = 2 * QV_7B.num_params * 2  # bf16 adapter down, bf16 delta up
    per_step = {}
    for wire in ("bfloat16", "float32"):
        sizes = message_bytes(wire, BATCH, TOKENS, hidden)
        per_step[wire] = sum(sizes.values())
        bytes_table.rows.append([wire, *[f"{v / (1 << 20):.2f} MiB" for v in sizes.values()],
                                 per_step[wire] / (1 << 20), f"{10 * per_step[wire] / lora_round:.1f}×"])

    chunk_table = Table(f"Sequence chunks (--split_sequence_chunk), 7B shape, batch {BATCH} × {TOKENS} tokens, bf16",
                        ["chunk tokens", "requests per step", "largest request body MiB", "per step MiB",
                         "more than unchunked"])
    chunked = {}
    for chunk in (0, 256, 128, 64):
        if chunk:
            sizes = chunked_bytes("bfloat16", BATCH, TOKENS, hidden, chunk)
        else:
            whole = message_bytes("bfloat16", BATCH, TOKENS, hidden)
            sizes = {"per step": sum(whole.values()), "requests": 2, "largest request body": whole["forward request"]}
        chunked[chunk] = sizes
        chunk_table.rows.append([chunk or "off", sizes["requests"], sizes["largest request body"] / (1 << 20),
                                 sizes["per step"] / (1 << 20), f"{sizes['per step'] - per_step['bfloat16']:,} B"])

    middle_blocks = len(plan.layers("middle"))
    scale = middle_blocks * (BATCH * TOKENS) / (measured_batch * measured_tokens)
    time_table = Table("Server time per split step, 7B shape, p = q = 2 (CPU, fp32, extrapolated)",
                       ["measured", "one block fwd+bwd s", "middle blocks", f"per step at {BATCH}×{TOKENS} s"])
    time_table.rows.append([f"batch {measured_batch} × {measured_tokens} tokens", seconds, middle_blocks,
                            seconds * scale])
    # The largest model measured decides: the tiny one is smaller than the interpreter around it.
    targets = [Target("client memory", "peak RSS of the ends below the full model's (largest model measured)",
                      f"{ratios[-1]:.2f}×", ratios[-1] < 1.0)]
    notes = [
        "Peak RSS includes the Python process with torch and transformers imported (the same in both columns), so "
        "the ratio understates the saving on the weights themselves; the 7B row counts parameters on the meta device.",
        "Server time is one 7B-shaped block (random weights) timed on this CPU and scaled linearly to the middle's "
        "blocks and tokens; on a GPU it is a small fraction of it.",
    ]
    data: dict[str, Any] = {"bytes_per_step": per_step, "lora_round_bytes_bf16": lora_round,
                            "block_seconds": seconds, "seven_b_parameters": counts, "chunked_bytes_bf16": chunked}
    write_results(NAME, TITLE, out_dir, quick=quick, params={"batch": BATCH, "tokens": TOKENS, "head": HEAD,
                                                             "tail": TAIL},
                  tables=[bytes_table, chunk_table, time_table, memory_table], targets=targets, notes=notes,
                  data=data)
    return True


if __name__ == "__main__":
    benchmark_main(NAME, __doc__, run)
