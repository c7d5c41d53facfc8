"""A tiny, randomly initialised model with the LLaVA-1.5 architecture, built offline.

Its text is meaningless, but everything around it is the real thing: the same config shape,
checkpoint layout, tokenizer special tokens, image processor and 576 image tokens per image as
`llava-hf/llava-1.5-13b-hf`, so vLLM and transformers load it exactly as they load the real model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

IMAGE_SIZE = 336
PATCH_SIZE = 14
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576, as in llava-1.5-13b

UNK, BOS, EOS, IMAGE, PAD = "<unk>", "<s>", "</s>", "<image>", "<pad>"

# transformers 5 names the weights `model.vision_tower.embeddings…` (no `vision_model.`), which
# vLLM's loader cannot place. The layout of the llava-hf checkpoints loads in both.
_LLAVA_HF_PREFIXES = {
    "model.language_model.": "language_model.model.",
    "lm_head.": "language_model.lm_head.",
    "model.vision_tower.": "vision_tower.vision_model.",
    "model.multi_modal_projector.": "multi_modal_projector.",
}


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model (config, fp32 safetensors, tokenizer, processor) to `out_dir`.

    Deterministic: the same seed gives byte-identical files. Returns `out_dir` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    config = _build_config(tokenizer)

    with torch.random.fork_rng():  # seed the init without touching the caller's RNG state
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        # Greedy decoding must run to max_tokens (tests count tokens), and streamed text should be
        # plain ASCII, one character per token. With no bias, a zero lm_head row has logit 0, below
        # the maximum of ~95 random logits for any realistic hidden state, so greedy never picks
        # EOS, the other special tokens, control bytes or partial UTF-8 sequences.
        lm_head = model.get_output_embeddings().weight
        lm_head[_unpickable_ids(tokenizer)] = 0.0

    state = {_llava_hf_name(k): v for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )
    processor.save_pretrained(out)
    return out


def _build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: one token per byte, so it encodes any text without training data."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([UNK, BOS, EOS, *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Like Llama's tokenizer: BOS in front of every encoded text.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS, IMAGE, PAD)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=4096,
    )


def _build_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: a size vLLM's CPU attention supports
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        # Wider than the default 0.02, so that prompt and image visibly change the greedy output
        # (with 0.02 every prompt gives the same text, and a parity test could miss a lost image).
        initializer_range=0.3,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        # vLLM picks its model class (and decides the model generates text) from this field.
        architectures=["LlavaForConditionalGeneration"],
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=IMAGE_SEQ_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )


def _unpickable_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Every id that does not decode to a single printable ASCII character."""
    return [
        i
        for i in range(len(tokenizer))
        if not ((text := tokenizer.decode([i])).isascii() and text.isprintable() and len(text) == 1)
    ]


def _llava_hf_name(name: str) -> str:
    for prefix, llava_hf in _LLAVA_HF_PREFIXES.items():
        if name.startswith(prefix):
            return llava_hf + name[len(prefix) :]
    raise ValueError(f"unexpected weight name {name}")
