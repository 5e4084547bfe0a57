"""Build the bundled demo: a tiny Llama, a locally trained tokenizer with a chat template, and
synthetic WRPO rows (train + held-out). Everything is seeded; the outputs are committed, so
this only needs rerunning to change the demo.

    python demo/make_demo.py

The rows mimic the paper's roles on small verifiable tasks: y_ws (the "source" answer) is
correct and explained, y_wt (the "target" answer) is correct but terse, y_l is wrong, and hedged half of the time.
"""

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).parent
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]
WORDS = ("apple river stone cloud tiger lemon piano window garden rocket silver candle forest planet "
         "bridge castle dragon island jacket kitten ladder marble needle orange pencil rabbit saddle "
         "tunnel violin wagon yellow zebra anchor basket cactus dinner engine falcon guitar hammer").split()


def task(rng):
    """(prompt, correct answer, explained answer, wrong answer) for one random task."""
    kind = rng.choice(["reverse", "add", "sort", "upper", "count"])
    if kind == "reverse":
        w = rng.choice(WORDS)
        right, wrong = w[::-1], rng.choice([w, w[::-1][1:] + w[-1], w[1:][::-1]])
        return f"Reverse the word '{w}'.", right, f"Reading '{w}' backwards gives {right}.", wrong
    if kind == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3, 10])
        return f"What is {a} + {b}?", str(a + b), f"Adding {a} and {b} gives {a + b}.", str(wrong)
    if kind == "sort":
        xs = rng.sample(range(1, 40), rng.randint(3, 5))
        right = " ".join(map(str, sorted(xs)))
        shuffled = xs[:]
        while sorted(shuffled) == shuffled:
            rng.shuffle(shuffled)
        return (f"Sort these numbers: {' '.join(map(str, xs))}.", right,
                f"In increasing order the numbers are {right}.", " ".join(map(str, shuffled)))
    if kind == "upper":
        w = rng.choice(WORDS)
        upper = w.upper()
        return f"Write '{w}' in capital letters.", upper, f"In capitals, '{w}' is {upper}.", w.capitalize()
    w = rng.choice(WORDS)
    n, off = len(w), rng.choice([-2, -1, 1, 2])
    return f"How many letters are in '{w}'?", str(n), f"The word '{w}' has {n} letters.", str(n + off)


def row(rng, i):
    prompt, right, explained, wrong = task(rng)
    # half of the wrong answers are hedged (easy to learn), half look like the terse right ones
    hedge = rng.choice(["Hmm, maybe {}? Not sure.", "I think it is {}, probably.", "{}", "{}"])
    return {
        "prompt_id": f"demo-{i:05d}",
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": explained}, {"role": "assistant", "content": right}],
        "rejected": [{"role": "assistant", "content": hedge.format(wrong)}],
    }


def train_bpe(texts, specials, vocab_size):
    """A byte-level BPE tokenizer (tokenizers.Tokenizer) trained on texts, the special tokens first (ids 0, 1, ...)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def build_tokenizer(texts):
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(texts, SPECIALS, 640), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|pad|>", chat_template=CHAT_TEMPLATE, model_max_length=512,
    )


def main():
    rng = random.Random(0)
    rows = [row(rng, i) for i in range(600)]
    (HERE / "data").mkdir(exist_ok=True)
    for name, part in (("train", rows[:480]), ("heldout", rows[480:])):
        with open(HERE / "data" / f"{name}.jsonl", "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")

    texts = [m["content"] for r in rows for m in r["prompt"] + r["chosen"] + r["rejected"]]
    tokenizer = build_tokenizer(texts)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(HERE / "model")
    tokenizer.save_pretrained(HERE / "model")
    print(f"demo: {len(rows)} rows, vocab {len(tokenizer)}, {sum(p.numel() for p in model.parameters())} parameters")


if __name__ == "__main__":
    main()
