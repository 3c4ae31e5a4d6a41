"""``fedllm export``: export, merge and try out the adapter of any round of a federation or simulation
(``export.py``).

    fedllm export adapter  --state_dir fl-state --round 5 --output_dir adapter-r5    # a PEFT directory
    fedllm export merge    --state_dir fl-state --output_dir merged-model            # base + adapter, merged
    fedllm export generate --state_dir fl-state --prompt "Name a fruit."            # quick check
    fedllm export generate --adapter adapter-r5 --prompts_file prompts.txt --max_new_tokens 64
    fedllm export merge    --state_dir fl-state --client_output_dir fl-client-output --output_dir merged
                           # a split federation: the server's middle + that client's head and tail
    fedllm export generate --state_dir fl-state --client_output_dir fl-client-output --prompt "Name a fruit."
                           # a split federation: head, middle and tail run as three parts (docs/split_learning.md)

The adapter comes from --adapter DIR (a PEFT directory) or --state_dir DIR [--round N] (default: the
latest round); generate also runs the base model alone with just --model_name_or_path. Options:
fedllm/config.py (EvaluationArguments); docs/simulation.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..config import EvaluationArguments
from . import EXIT_OK, EXIT_USAGE, parse_options

COMMANDS = ("adapter", "merge", "generate")


def _prompts(args: EvaluationArguments, tokenizer, template: str) -> list[str]:
    from ..data import apply_template
    from ..evaluation import load_examples

    if args.prompt:
        return [apply_template(template, args.prompt, tokenizer=tokenizer)]
    if not args.prompts_file:
        raise ValueError("generate needs --prompt TEXT or --prompts_file FILE")
    if Path(args.prompts_file).suffix == ".txt":
        lines = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        return [apply_template(template, line, tokenizer=tokenizer) for line in lines]
    examples = load_examples(args.prompts_file, tokenizer=tokenizer, template=template, dataset_format=args.dataset_format,
                             field_map=args.field_map, max_samples=args.max_samples, seed=args.seed)
    return [e.prompt for e in examples]


def run(command: str, args: EvaluationArguments) -> None:
    from ..export import export_adapter, load_adapter, merge_adapter

    source = load_adapter(args.adapter, args.state_dir, args.round, args.client_output_dir)
    if command in ("adapter", "merge"):
        if source is None:
            raise ValueError(f"{command} needs --adapter DIR or --state_dir DIR")
        if not args.output_dir:
            raise ValueError(f"{command} needs --output_dir")
        if command == "adapter":
            path = export_adapter(source, args.output_dir)
        else:
            path = merge_adapter(source, args.output_dir, model_name_or_path=args.model_name_or_path,
                                 dtype=args.merge_dtype)
        print(f"{source.description} -> {path}")
        return
    from ..evaluation import Evaluator
    from ..evaluation.evaluator import generate_texts
    from ..export import split_generator

    split = source is not None and source.federation.get("fed_mode") == "split"
    if split:  # the three parts as three, a KV cache on each, hidden states between them
        model, tokenizer = split_generator(source, args.model_name_or_path)
        device = "cpu"
    else:
        evaluator = Evaluator.for_adapter(source, args.model_name_or_path, args.device)
        model, tokenizer, device = evaluator.model, evaluator.tokenizer, evaluator.device
    template = args.template or (source.federation.get("template") if source else None) or "alpaca"
    prompts = _prompts(args, tokenizer, template)
    outputs = generate_texts(model, tokenizer, device, prompts, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens)
    for prompt, output in zip(prompts, outputs, strict=True):
        print(f"### prompt\n{prompt}\n### generation\n{output}\n")
    if split:
        prefill, *steps = model.last.exchanges
        per_step = f"; each decoding step {steps[0].sent} B up, {steps[0].received} B down" if steps else ""
        print(f"split generation (last batch): prefill {prefill.sent} B up, {prefill.received} B down{per_step} "
              f"(--wire_dtype {model.shape.wire_dtype})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return EXIT_OK
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return EXIT_USAGE
    (args,) = parse_options((EvaluationArguments,), argv[1:])
    from ..data import DataFormatError

    try:
        run(argv[0], args)
    except (DataFormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK

