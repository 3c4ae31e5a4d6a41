"""A tiny Llama with its own byte-level BPE tokenizer, built offline: random in seconds, or pretrained.

Tests and the demo use the random one (:func:`build_tiny_llama`; :func:`build_tiny_gpt2` for a GPT-2 with the
same tokenizer) so that nothing is downloaded from a model hub; the build is deterministic for a given seed: the same seed gives byte-identical weights and
vocabulary.

:func:`pretrain_tiny_llama` (``python -m fedllm.tiny --pretrain --output_dir DIR [--seed S]``) trains a
small Llama (about 1.5M parameters) from scratch as a causal language model on offline text -- by
default Alpaca-style instruction data from ``../shared/datasets`` (alpaca_5000 and alpaca_gpt4_demo,
rendered with the chat template; neither the Financial PhraseBank nor Dolly, which the learning-quality
studies fine-tune and test on) -- so that studies start from a base that knows some English and the
template. Minutes on 2 CPU cores; deterministic for a seed on one machine; cached: a directory that
already holds a finished pretraining with the same settings, seed and corpus is returned as is.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# A chat template in the common role/content form so `--template chat` works with the tiny model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _training_corpus() -> list[str]:
    """Text that covers the templates, English words and digits the tests and demo use."""
    words = (
        "the a an of to and in is it you that he was for on are with as I his they be at one have "
        "this from or had by word but what some we can out other were all there when up use your how "
        "said each she which do their time if will way about many then them write would like so these "
        "her long make thing see him two has look more day could go come did number sound no most "
        "people my over know water than call first who may down side been now find any new work part "
        "take get place made live where after back little only round man year came show every good me "
        "give our under name very through just form sentence great think say help low line differ turn "
        "cause much mean before move right boy old too same tell does set three want air well also play "
        "small end put home read hand port large spell add even land here must big high such follow act "
        "why ask men change went light kind off need house picture try us again animal point mother world "
        "near build self earth father red blue green yellow apple banana cherry cat dog bird fish positive "
        "negative neutral answer question instruction input output response context user assistant system"
    ).split()
    lines = [
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.",
        "### Instruction:", "### Input:", "### Response:", "USER:", "ASSISTANT:",
        "A chat between a curious user and an artificial intelligence assistant.",
        "<|user|>", "<|assistant|>", "<|system|>", "#### 42",
    ]
    lines += [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [" ".join(str(n) for n in range(k, k + 20)) for k in range(0, 200, 20)]
    return lines * 4


def build_tokenizer(vocab_size: int = 1024, corpus: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus`` (default: the small built-in one)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus() if corpus is None else corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_llama(output_dir: str | Path, seed: int = 0, vocab_size: int = 1024, num_hidden_layers: int = 2) -> Path:
    """Write a tokenizer and a randomly initialised Llama (2 layers unless told) to ``output_dir``."""
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Larger than Llama's 0.02 so the random lm_head gives peaked, not near-uniform, outputs:
        # then a LoRA adapter on the attention alone can move the loss within a few dozen steps.
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return _save_tiny(LlamaForCausalLM(config), tokenizer, output_dir)


def build_tiny_gpt2(output_dir: str | Path, seed: int = 0, vocab_size: int = 1024, num_hidden_layers: int = 4) -> Path:
    """Write the tokenizer of :func:`build_tiny_llama` and a randomly initialised GPT-2 (learned positions, LM head
    tied to the token embedding, as GPT-2's) to ``output_dir``."""
    output_dir = Path(output_dir)
    tokenizer = build_tokenizer(vocab_size)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_inner=128,
        n_layer=num_hidden_layers,
        n_head=4,
        n_positions=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # No dropout (GPT-2 has 0.1), as the tiny Llama has none: a training step is then a function of the
        # weights and the batch, and split training can be checked against single-process training exactly.
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        initializer_range=0.2,  # as the tiny Llama's: peaked outputs that a small LoRA moves
    )
    torch.manual_seed(seed)
    return _save_tiny(GPT2LMHeadModel(config), tokenizer, output_dir)


def _save_tiny(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, output_dir: Path) -> Path:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


DATASETS_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets"
PRETRAIN_SOURCES = ("alpaca_5000/alpaca_5000.json", "alpaca_gpt4_demo/alpaca_en_demo.json")
PRETRAIN_FILE = "pretrain.json"  # written last: its presence marks a finished, reusable pretraining


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """Model size and schedule of :func:`pretrain_tiny_llama` (the defaults fit about 5 minutes on 2 cores)."""

    vocab_size: int = 3072
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    seq_length: int = 128  # tokens per packed training sequence
    batch_size: int = 16
    steps: int = 240
    learning_rate: float = 3e-3  # AdamW peak, linear warm-up over 5% of the steps, then cosine to 10%
    weight_decay: float = 0.01


def pretraining_corpus(sources: Sequence[str | Path] | None = None) -> list[str]:
    """Documents to pretrain on: every record of ``sources`` (any SFT format of docs/data.md) rendered with
    the chat template (``--template chat``, the shortest prompt) and its response; plain-text records as they are. Default: :data:`PRETRAIN_SOURCES`
    under ``../shared/datasets``, or the demo generator's data when that folder is absent."""
    from .data import apply_template
    from .data.formats import parse_rows, resolve_format
    from .data.records import read_rows

    if sources is None:
        sources = [DATASETS_DIR / name for name in PRETRAIN_SOURCES if (DATASETS_DIR / name).exists()]
        if not sources:
            import tempfile

            from .data.demo import write_demo_data

            with tempfile.TemporaryDirectory() as tmp:
                paths = write_demo_data(tmp, num_clients=4, rows_per_client=500, seed=0)
                return pretraining_corpus(paths)
    renderer = build_tokenizer()  # only for its chat template (the same in every tokenizer built here)
    documents = []
    for source in sources:
        rows = read_rows(str(source), None)
        fmt = resolve_format(rows, None, "sft")
        for item in parse_rows(rows, fmt):
            if isinstance(item, str):
                documents.append(item)
            else:
                prompt, response = item[0], item[1]
                documents.append(apply_template("chat", prompt.instruction, prompt.input, tokenizer=renderer,
                                                history=prompt.history) + response + renderer.eos_token)
    return documents


def _packed_sequences(tokenizer: PreTrainedTokenizerFast, documents: Sequence[str], seq_length: int) -> torch.Tensor:
    """All documents as one stream ``<s> doc </s> <s> doc </s> ...`` cut into rows of ``seq_length``."""
    stream: list[int] = []
    for ids in tokenizer(list(documents), add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    rows = len(stream) // seq_length
    return torch.tensor(stream[: rows * seq_length]).view(rows, seq_length)


def _fingerprint(documents: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def pretrain_tiny_llama(output_dir: str | Path, seed: int = 0, settings: PretrainSettings | None = None,
                        corpus: Sequence[str] | None = None, log_every: int = 50) -> Path:
    """Pretrain a small Llama on ``corpus`` (default :func:`pretraining_corpus`) and write it with its tokenizer.

    Next-token cross-entropy on packed sequences, AdamW, batches drawn with ``torch.Generator(seed)``.
    The tokenizer is trained on the same corpus. Returns ``output_dir``; reuses it when its
    ``pretrain.json`` records the same settings, seed and corpus.
    """
    output_dir = Path(output_dir)
    settings = settings or PretrainSettings()
    documents = list(pretraining_corpus() if corpus is None else corpus)
    identity = {"seed": seed, "settings": dataclasses.asdict(settings), "corpus_sha256": _fingerprint(documents),
                "documents": len(documents)}
    marker = output_dir / PRETRAIN_FILE
    if marker.exists():
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in identity} == identity:
            return output_dir
        raise ValueError(f"{output_dir} holds a pretraining with other settings, seed or corpus; choose another "
                         "--output_dir or delete it")
    started = time.time()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(settings.vocab_size, corpus=documents)
    data = _packed_sequences(tokenizer, documents, settings.seq_length)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_attention_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay, betas=(0.9, 0.95))
    warmup = max(1, settings.steps // 20)

    def rate(step: int) -> float:  # multiplier of the peak rate
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, settings.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(settings.steps):
        batch = data[torch.randint(len(data), (settings.batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            print(f"pretrain step {step + 1}/{settings.steps} loss {sum(recent) / len(recent):.3f}", flush=True)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    tail = losses[-max(1, min(50, len(losses))):]
    record = {**identity, "parameters": sum(p.numel() for p in model.parameters()),
              "tokens_in_corpus": data.numel(), "tokens_trained": settings.steps * settings.batch_size *
              settings.seq_length, "final_loss": sum(tail) / len(tail), "seconds": time.time() - started}
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(marker)
    return output_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedllm.tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", nargs="?", help="Where to write the model (or use --output_dir).")
    parser.add_argument("--output_dir", help="Where to write the model.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain", action="store_true", help="Pretrain a small Llama instead of a random one.")
    parser.add_argument("--corpus", nargs="+", help="Pretraining data files (default: alpaca_5000 and "
                                                    "alpaca_gpt4_demo in ../shared/datasets).")
    defaults = PretrainSettings()
    for f in dataclasses.fields(PretrainSettings):
        parser.add_argument(f"--{f.name}", type=f.type if callable(f.type) else type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name), help="with --pretrain")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or args.directory
    if not output_dir:
        parser.error("give the output directory (positional or --output_dir)")
    if not args.pretrain:
        print(build_tiny_llama(output_dir, seed=args.seed))
        return
    settings = PretrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainSettings)})
    corpus = pretraining_corpus(args.corpus) if args.corpus else None
    print(pretrain_tiny_llama(output_dir, seed=args.seed, settings=settings, corpus=corpus))


if __name__ == "__main__":
    main()
