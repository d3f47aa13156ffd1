"""The tiny local model zoo: real architectures with random weights and locally trained tokenizers."""

from __future__ import annotations

import json
import logging
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.models.clip import CLIPImageProcessorPil  # PIL backend: needs no torchvision

logger = logging.getLogger(__name__)

# ChatML, as Qwen2 uses; the zoo's causal LMs ship it like a real checkpoint does.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The same ChatML, with content parts: {"type": "image"} becomes the processor's <image> placeholder.
CHATML_VISION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_TOKEN = "<image>"
CAUSAL_SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # T5's fixed ids: pad 0, eos 1, unk 2

# A small, varied corpus so the tokenizers see words of every default domain.
_CORPUS = {
    "medical": [
        "The patient presents with fever, cough and shortness of breath for three days.",
        "What is the recommended dose of amoxicillin for an adult with otitis media?",
        "Symptoms of type 2 diabetes include thirst, frequent urination and fatigue.",
        "Hypertension is managed with lifestyle changes and ACE inhibitors or diuretics.",
        "An MRI of the knee showed a torn meniscus; physiotherapy was advised.",
        "Side effects of ibuprofen can include stomach pain, nausea and kidney problems.",
        "Blood pressure 150/95, heart rate 88, oxygen saturation 97 percent.",
    ],
    "code": [
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
        "Write a Python function that parses a CSV file and returns a list of dicts.",
        "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 5;",
        "Why does my JavaScript promise never resolve when I forget to call resolve()?",
        "for (int i = 0; i < n; ++i) { sum += values[i]; }",
        "TypeError: 'NoneType' object is not subscriptable in line 42 of main.py",
        "git rebase -i HEAD~3 lets you squash the last three commits.",
    ],
    "general": [
        "What is the capital of France and why is it famous?",
        "Write a short poem about the autumn rain falling on the city.",
        "Explain the difference between weather and climate in simple words.",
        "Recommend three books for someone who enjoyed science fiction.",
        "How do I make a simple tomato pasta sauce at home?",
        "The history of the Roman Empire spans more than a thousand years.",
        "Plan a three day trip to the mountains with a small budget.",
    ],
}

DEFAULT_SPECIALISTS: dict[str, str] = {"medical": "qwen2", "code": "llama", "general": "qwen2"}


@dataclass
class TinyLMConfig:
    """Sizes of a zoo causal LM (a few hundred thousand parameters)."""

    hidden: int = 64  # model width D
    layers: int = 2  # decoder blocks
    heads: int = 4  # attention heads
    kv_heads: int = 2  # grouped KV heads, as in Qwen2 / Llama 3
    intermediate: int = 192  # MLP width
    context: int = 1024  # max_position_embeddings
    init_range: float = 0.2  # wide init so greedy argmax is robust to float noise


def corpus_lines(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = [line for texts in _CORPUS.values() for line in texts]
    extra = []
    words = " ".join(lines).split()
    for _ in range(400):  # recombined word salad widens the BPE merges beyond the seed sentences
        extra.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))))
    return lines * 20 + extra


def train_bpe_tokenizer(lines: list[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    """Byte-level BPE (as GPT-2/Qwen2/Llama 3 use) trained on the given lines."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return tok


def causal_tokenizer(seed: int) -> PreTrainedTokenizerFast:
    tok = train_bpe_tokenizer(corpus_lines(seed), vocab_size=1024, specials=CAUSAL_SPECIALS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        model_max_length=1024,
    )
    hf.chat_template = CHATML_TEMPLATE
    return hf


def t5_tokenizer(seed: int) -> PreTrainedTokenizerFast:
    tok = train_bpe_tokenizer(corpus_lines(seed), vocab_size=1024, specials=T5_SPECIALS)
    # T5 appends </s> to every encoded sequence.
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def lm_config_kwargs(tokenizer: PreTrainedTokenizerFast, cfg: TinyLMConfig) -> dict[str, Any]:
    """The decoder sizes and special ids every zoo language model (and the VLM's text model) shares."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.context,
        initializer_range=cfg.init_range,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )


def tiny_causal_lm(arch: str, tokenizer: PreTrainedTokenizerFast, cfg: TinyLMConfig) -> torch.nn.Module:
    common = lm_config_kwargs(tokenizer, cfg)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    raise ValueError(f"unknown zoo architecture {arch!r}; expected qwen2 or llama")


@dataclass
class TinyVisionConfig:
    """Sizes of the zoo's vision tower (CLIP ViT): a 32x32 image in 8x8 patches is 16 image tokens."""

    hidden: int = 32  # vision width
    layers: int = 2
    heads: int = 4
    intermediate: int = 64
    image_size: int = 32  # the image processor resizes and crops to this
    patch_size: int = 8


def tiny_vlm(seed: int, lm: TinyLMConfig, vision: TinyVisionConfig) -> tuple[torch.nn.Module, LlavaProcessor]:
    """A Llava-style image-text-to-text model (tiny CLIP vision tower, projector, tiny Llama) and its
    processor (CLIP image processor, the zoo tokenizer plus an <image> token, ChatML with image parts)."""
    tok = causal_tokenizer(seed)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|endoftext|>", IMAGE_TOKEN]})
    tok.chat_template = CHATML_VISION_TEMPLATE
    side = vision.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",  # drop CLIP's class token: one image token per patch
        num_additional_image_tokens=1,  # ...which the vision tower adds in front of the patches
        chat_template=CHATML_VISION_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    text = LlamaConfig(**lm_config_kwargs(tok, lm))
    tower = CLIPVisionConfig(
        hidden_size=vision.hidden,
        intermediate_size=vision.intermediate,
        num_hidden_layers=vision.layers,
        num_attention_heads=vision.heads,
        image_size=side,
        patch_size=vision.patch_size,
    )
    config = LlavaConfig(
        vision_config=tower,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(side // vision.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config), processor


def tiny_t5(tokenizer: PreTrainedTokenizerFast, d_model: int = 64) -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",  # FLAN-T5's (T5 v1.1) MLP
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        initializer_factor=1.0,
    )
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():
        # Random weights often make <pad> or </s> the argmax, so the tiny synthesizer would say nothing;
        # zero their output rows so demos and tests see text. Real checkpoints are untouched by this.
        for special in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
            model.lm_head.weight[special] = 0.0
    return model


def add_random_lora(model_dir: Path, out_dir: Path, seed: int) -> None:
    """A LoRA adapter with random (non-zero) weights, saved as a real peft adapter directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(base, lora).save_pretrained(out_dir)


def build_zoo(
    out: str | Path, seed: int = 0, specialists: dict[str, str] | None = None, vision: bool = True
) -> dict[str, str]:
    """Write the zoo to `out`; return name -> directory. Deterministic for a given seed.

    With `vision`, `out/vision` holds a tiny Llava-style image-text-to-text model with its processor.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specialists = specialists or DEFAULT_SPECIALISTS
    paths: dict[str, str] = {}
    tok = causal_tokenizer(seed)
    for name, arch in sorted(specialists.items()):
        # Seeded per name, so a model does not change when other specialists are added.
        torch.manual_seed(seed * 1000 + zlib.crc32(name.encode()) % 997)
        model = tiny_causal_lm(arch, tok, TinyLMConfig())
        d = out / name
        model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        paths[name] = str(d)
        logger.info("zoo: %s (%s, %d params) -> %s", name, arch, sum(p.numel() for p in model.parameters()), d)
    torch.manual_seed(seed * 1000 + 999)
    t5tok = t5_tokenizer(seed)
    t5 = tiny_t5(t5tok)
    t5.save_pretrained(out / "t5", safe_serialization=True)
    t5tok.save_pretrained(out / "t5")
    paths["t5"] = str(out / "t5")
    if vision:
        vlm, processor = tiny_vlm(seed * 1000 + zlib.crc32(b"vision") % 997, TinyLMConfig(), TinyVisionConfig())
        vlm.save_pretrained(out / "vision", safe_serialization=True)
        processor.save_pretrained(out / "vision")
        paths["vision"] = str(out / "vision")
        logger.info("zoo: vision (llava, %d params) -> %s", sum(p.numel() for p in vlm.parameters()), out / "vision")
    if "general" in specialists:
        for j, adapter in enumerate(("lora-a", "lora-b")):
            add_random_lora(out / "general", out / "adapters" / adapter, seed=seed * 1000 + 500 + j)
            paths[f"adapters/{adapter}"] = str(out / "adapters" / adapter)
    (out / "zoo.json").write_text(json.dumps({"seed": seed, "paths": paths}, indent=2))
    return paths
