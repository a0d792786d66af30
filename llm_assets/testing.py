"""Offline model folders for tests and benchmarks: no model hub needed.

``build_llama_model`` trains a byte-level BPE tokenizer on local text, gives it a ChatML chat
template, and writes a Llama config (plus random weights, unless the caller runs vLLM with
``load_format="dummy"``). Tiny ones (hidden 128, 2 layers, head_dim 64) build in seconds and run
on vLLM's CPU build; large ones describe the benchmark models on the GPU. ``build_idefics3_model``
(images) and ``build_qwen2_audio_model`` (audio) write tiny random multimodal models with their
processors, for vLLM's CPU build; ``build_qwen2_vl_model`` (images and video) needs torchvision.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _training_text() -> list[str]:
    """Local English-ish text: the docstrings and sources of a few stdlib modules."""
    import argparse
    import collections
    import json as json_module
    import pathlib
    import textwrap

    lines: list[str] = []
    for module in (argparse, collections, json_module, pathlib, textwrap, inspect):
        lines.extend(inspect.getsource(module).splitlines())
    return [line for line in lines if line.strip()]


def build_tokenizer(path: Path, vocab_size: int = 1024, pad_to: int = 0) -> int:
    """Train and save a byte-level BPE tokenizer with a chat template; returns its vocab size.

    ``pad_to`` adds reserved special tokens up to that size, so that every id a model with that
    vocab can generate (dummy weights generate any) decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    # Like Llama's, the tokenizer puts a BOS before raw text (chat-templated text carries its own).
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.token_to_id("<|endoftext|>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    if pad_to > len(fast):
        fast.add_special_tokens({"additional_special_tokens": [f"<|reserved_{i}|>" for i in range(len(fast), pad_to)]})
    fast.save_pretrained(str(path))
    return len(fast)


def _padded_vocab(tokens: int) -> int:
    """A model's vocab size for ``tokens`` tokens: rounded up to a multiple of 64."""
    return (tokens + 63) // 64 * 64


def _multimodal_tokenizer(path: Path, special_tokens: list[str]):
    """A new folder ``path`` with the trained tokenizer, loaded and given the model's media tokens
    (the processor saves it with them)."""
    from transformers import AutoTokenizer

    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})
    return tokenizer


def build_llama_model(
    path: str | Path,
    *,
    hidden_size: int = 128,
    intermediate_size: int | None = None,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int | None = None,
    vocab_size: int | None = None,
    tokenizer_vocab: int = 1024,
    max_position_embeddings: int = 2048,
    dtype: str = "float32",
    with_weights: bool = True,
    seed: int = 0,
) -> Path:
    """Write a Llama model folder (config, tokenizer, optionally random weights) to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n_tokens = build_tokenizer(path, tokenizer_vocab, pad_to=vocab_size or 0)
    vocab = max(vocab_size or 0, _padded_vocab(n_tokens))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads or num_heads,
        "head_dim": hidden_size // num_heads,
        "vocab_size": vocab,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }
    if with_weights:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**config))
        model.save_pretrained(str(path), safe_serialization=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 2}))
    return path


# Renders string content (vLLM's "string" format puts "<image>" in the text) and content parts.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_idefics3_model(path: str | Path, *, image_size: int = 64, patch_size: int = 8, seed: int = 0) -> Path:
    """A tiny Idefics3 (SmolVLM's architecture) vision-language model with random weights: a SigLIP-like
    vision tower, a Llama text model (hidden 128, 2 layers, head_dim 64) and an Idefics3 processor
    with PIL image processing (torchvision is not needed). vLLM's CPU build runs it; one image
    becomes (image_size / patch_size)^2 / 4 image tokens plus its wrapping tokens."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    path = Path(path)
    tokenizer = _multimodal_tokenizer(
        path, ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    )
    images = Idefics3ImageProcessorPil(
        size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size}, do_image_splitting=False
    )
    scale = 2
    processor = Idefics3Processor(
        image_processor=images,
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch_size) ** 2 // scale**2,
        chat_template=VLM_CHAT_TEMPLATE,
    )
    vocab = _padded_vocab(len(tokenizer))
    text = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        pad_token_id=0,
        vocab_size=vocab,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    vision = Idefics3VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        vocab_size=vocab,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    Idefics3ForConditionalGeneration(config).save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


# Renders string content (vLLM's "string" format puts "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>"
# in the text) and content parts: an audio part of any kind becomes that placeholder.
AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('audio', 'input_audio', 'audio_url') %}{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_audio_model(path: str | Path, *, seed: int = 0) -> Path:
    """A tiny Qwen2-Audio audio-language model with random weights: a Whisper-like audio encoder
    (d_model 64, 1 layer), a Qwen2 text model (hidden 128, 2 layers, head_dim 64) and a Qwen2-Audio
    processor with a Whisper feature extractor (80 mel bins, audio cut or padded to 30 s: vLLM's
    input schema fixes 3000 mel frames). vLLM's CPU build runs it; an audio of n samples
    at 16 kHz becomes ((n // 160 - 1) // 2 + 1 - 2) // 2 + 1 ``<|AUDIO|>`` tokens (0.5 s: 12)."""
    import torch
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
        WhisperFeatureExtractor,
    )

    path = Path(path)
    tokenizer = _multimodal_tokenizer(path, ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"])
    features = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30)
    processor = Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer, chat_template=AUDIO_CHAT_TEMPLATE)
    vocab = _padded_vocab(len(tokenizer))
    text = Qwen2Config(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    # The encoder takes exactly 30 s of mel frames (100 a second), halved by its second convolution.
    audio = Qwen2AudioEncoderConfig(
        num_mel_bins=80,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=128,
        d_model=64,
        max_source_positions=1500,
    )
    config = Qwen2AudioConfig(
        audio_config=audio.to_dict(),
        text_config=text.to_dict(),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    torch.manual_seed(seed)
    Qwen2AudioForConditionalGeneration(config).save_pretrained(str(path))
    _fix_qwen2_audio_weight_names(path / "model.safetensors")
    processor.save_pretrained(str(path))
    return path


def _fix_qwen2_audio_weight_names(file: Path) -> None:
    """transformers 5 saves the text model's weights as ``language_model.model.model.*`` (its
    reverse key mapping adds a ``model.`` to the checkpoint's ``language_model.model.*``); vLLM
    loads Qwen2-Audio checkpoints' names and refuses those ("no module or parameter named 'model'
    in Qwen2Model")."""
    from safetensors.torch import load_file, save_file

    wrong = "language_model.model.model."
    weights = load_file(str(file))
    if any(name.startswith(wrong) for name in weights):
        fixed = {
            ("language_model.model." + name[len(wrong) :] if name.startswith(wrong) else name): t
            for name, t in weights.items()
        }
        save_file(fixed, str(file), metadata={"format": "pt"})


# Renders string content (vLLM's "string" format puts "<|vision_start|><|video_pad|><|vision_end|>" in
# the text) and content parts: an image or video part of any kind becomes its placeholder.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] in ('image', 'image_url') %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_vl_model(path: str | Path, *, max_pixels: int = 112 * 112, seed: int = 0) -> Path:
    """A tiny Qwen2-VL (images and video) with random bfloat16 weights: a vision tower (embed 128, head_dim 64,
    1 block), a Qwen2 text model (hidden 128, 2 layers, head_dim 64, M-RoPE) and a Qwen2-VL processor.
    Its video processor needs torchvision, so it builds where torchvision is installed (the GPU test
    machine), not with vLLM's CPU build. A video of T frames (as sampled: vLLM takes 2 a second) of
    H x W, resized to multiples of 28, becomes T/2 * H/28 * W/28 ``<|video_pad|>`` tokens."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = _multimodal_tokenizer(path, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    pixels = {"min_pixels": 28 * 28, "max_pixels": max_pixels}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in [
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        ]
    }
    vocab = _padded_vocab(len(tokenizer))
    # M-RoPE splits head_dim / 2 = 32 rotary frequencies into time, height and width sections.
    text = {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
    }
    vision = {
        "depth": 1,
        "embed_dim": 128,
        "hidden_size": 128,
        "mlp_ratio": 2,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(text_config=text, vision_config=vision, vocab_size=vocab, **ids)
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


# What a tensor-parallel engine runs with on the GPU test machines, where NVLink multicast is off
# (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1): vLLM 0.26 picks all-reduce paths there
# that need it (its symmetric-memory all-reduce crashed raw vLLM's TP=2; the all-reduce + RMSNorm
# fusion's FlashInfer MNNVL workspace failed llm_assets'; docs/benchmarks.md, sitting 12). NCCL and
# vLLM's custom all-reduce remain. Used by tests/test_gpu.py and the bench (bench/run.sh exports
# the same variables for every process of a TP run).
TP_SAFE_ENV = {"VLLM_ALLREDUCE_USE_SYMM_MEM": "0", "VLLM_ALLREDUCE_USE_FLASHINFER": "0"}
TP_SAFE_ENGINE_KWARGS = {"compilation_config": {"pass_config": {"fuse_allreduce_rms": False}}}
