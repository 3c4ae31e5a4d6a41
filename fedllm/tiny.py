"""A tiny random Llama with its own byte-level BPE tokenizer, built offline in seconds.

Tests and the demo use it so that nothing is downloaded from a model hub. The build is
deterministic for a given seed: the same seed gives byte-identical weights and vocabulary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
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
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_llama(args.output_dir, seed=args.seed))


if __name__ == "__main__":
    main()
