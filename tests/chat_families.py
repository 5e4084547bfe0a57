"""Tiny stand-ins for the model families WRPO targets (Llama-3.1/3.2, Qwen2.5, Gemma-2, Mistral, ChatML models):
each a locally trained tokenizer with the family's special tokens and a chat template written from the family's
documented format, and a tiny model config of its architecture with the family's quirks."""

import json
import random
from dataclasses import dataclass, field
from pathlib import Path


# Llama-3.1: BOS in the template; a system header always, with the model's knowledge cut-off and today's date
# (the date_string variable, else a default); a given system turn goes below the dates. Turns end with <|eot_id|>.
LLAMA31 = """{{- bos_token }}
{%- if date_string is not defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\nToday Date: " + date_string + "\\n\\n" }}
{{- system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {{- "<|start_header_id|>" + message['role'] + "<|end_header_id|>\\n\\n" + message['content'] | trim }}
    {{- "<|eot_id|>" }}
{%- endfor %}
{%- if add_generation_prompt %}{{- "<|start_header_id|>assistant<|end_header_id|>\\n\\n" }}{%- endif %}
"""

# Qwen2.5: ChatML, no BOS; a default system prompt when the conversation does not start with a system turn.
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\n""" + QWEN_SYSTEM + """<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message['role'] == 'system' and loop.first) %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# Gemma-2: BOS in the template; no system role; user and assistant must alternate; the assistant's turns are
# headed `model`; turns end with <end_of_turn> and a newline.
GEMMA2 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
    {{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}
"""

# Mistral (Instruct v0.1/v0.2): BOS in the template; [INST] ... [/INST] around user turns, which must alternate with
# assistant turns; no system role; an assistant turn ends with EOS; no generation prompt (the prompt ends at [/INST]).
MISTRAL = """{{- bos_token }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}
    {%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

# ChatML (OpenHermes, Yi, ...): every turn <|im_start|>role\n...<|im_end|>\n; no BOS, no default system prompt.
CHATML = """{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


@dataclass
class Family:
    template: str
    specials: list  # special tokens, in id order from 0
    bos: str | None
    eos: str
    pad: str | None  # None: the tokenizer has no pad token (Llama-3, Mistral)
    end: str  # the token that ends an assistant turn
    system: bool  # whether the template takes a system turn (else it refuses one)
    arch: str  # transformers config class
    quirks: dict = field(default_factory=dict)  # config settings of the family's models
    vocab_extra: int = 0  # embedding rows past the tokenizer's tokens (Qwen2.5-7B: 151936 rows, 151665 tokens)
    stop: tuple = ()  # more tokens that end generation (generation_config.json lists them with EOS)


FAMILIES = {
    # Llama-3.2-1B/3B: tied embeddings, two stop tokens, no pad token; Llama-3.1's template (3.2's: today's date)
    "llama3.1": Family(LLAMA31, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                 "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", None, "<|eot_id|>", True,
                       "LlamaConfig", dict(tie_word_embeddings=True), stop=("<|end_of_text|>",)),
    # Qwen2.5: the embedding padded past the tokenizer (151936 rows for 151665 tokens), tied at the small sizes
    "qwen2.5": Family(QWEN25, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
                      "<|im_end|>", True, "Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=False),
                      vocab_extra=100),
    # Gemma-2: soft-capped attention and final logits, sliding-window layers, a scaled embedding, tied
    "gemma2": Family(GEMMA2, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
                     "<pad>", "<end_of_turn>", False, "Gemma2Config",
                     dict(head_dim=8, sliding_window=24, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
                     stop=("<end_of_turn>",)),
    # Mistral-7B: a sliding window longer than any row here; no pad token
    "mistral": Family(MISTRAL, ["<unk>", "<s>", "</s>"], "<s>", "</s>", None, "</s>", False, "MistralConfig",
                      dict(sliding_window=4096, tie_word_embeddings=False)),
    # a ChatML model whose pad token is its EOS
    "chatml": Family(CHATML, ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>", "<|im_end|>", True,
                     "LlamaConfig", dict(tie_word_embeddings=False)),
}

WORDS = ("the cat sat on a mat while two dogs ran far away from home and every bird sang songs of blue skies "
         "paris is the capital of france what is two plus three five answer question please briefly explain why "
         "be concise you are a helpful assistant hello hi there thanks sure").split()


def sentence(rng, longest):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, longest))).capitalize() + "."


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    return [sentence(rng, 12) for _ in range(n)]


def build_tokenizer(family):
    """A byte-level BPE trained here on a small corpus, with the family's special tokens and template."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from demo.make_demo import train_bpe  # the demo tokenizer's training

    fixed = ["[INST] [/INST]", "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024", QWEN_SYSTEM,
             "Answer briefly."]  # text the templates write, and the system turn of write_rows
    tok = train_bpe(corpus() + fixed * 20, family.specials, 600)
    if family.bos:  # as the real tokenizers do, unless told add_special_tokens=False (the data path does)
        tok.post_processor = processors.TemplateProcessing(single=f"{family.bos} $A", pair=f"{family.bos} $A $B",
                                                           special_tokens=[(family.bos, tok.token_to_id(family.bos))])
    named = {k: v for k, v in dict(bos_token=family.bos, eos_token=family.eos, pad_token=family.pad).items() if v}
    extra = [t for t in family.specials if t not in named.values()]
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=family.template, model_max_length=512,
                                   extra_special_tokens=extra, **named)


def build_model(family, tokenizer, path, seed=0, max_shard_size="40KB"):
    """Save a tiny random model of the family's architecture, sharded, with the tokenizer beside it."""
    import torch
    import transformers as tf

    vocab = len(tokenizer) + family.vocab_extra
    ids = lambda t: tokenizer.convert_tokens_to_ids(t) if t else None  # noqa: E731
    config = getattr(tf, family.arch)(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=ids(family.bos),
        eos_token_id=ids(family.eos), pad_token_id=ids(family.pad), **family.quirks)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    stop = [ids(family.eos)] + [ids(t) for t in family.stop]
    model.generation_config.eos_token_id = stop if len(stop) > 1 else stop[0]
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(path)
    return model


def write_rows(path, n=24, seed=0, system=None):
    """WRPO rows (a source and a target chosen response, one rejected) from the corpus; half with two-turn prompts."""
    rng = random.Random(seed)
    text = lambda: sentence(rng, 10)  # noqa: E731
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": text()}]
        if i % 2:
            prompt += [{"role": "assistant", "content": text()}, {"role": "user", "content": text()}]
        if system:
            prompt = [{"role": "system", "content": system}] + prompt
        rows.append({"prompt_id": f"p{i}", "prompt": prompt, "chosen": [{"role": "assistant", "content": text()}
                     for _ in range(2)], "rejected": [{"role": "assistant", "content": text()}]})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

