"""Tiny random text encoders and tokenizers saved into a folder (no download): CLIPTextModel,
CLIPTextModelWithProjection and T5EncoderModel with a word-level tokenizer of a small vocabulary
built with the ``tokenizers`` library, wrapped in ``PreTrainedTokenizerFast``; and diffusers-style
pipeline roots of them (sdxl, sd3, flux). Used by tests/test_text.py and :mod:`jobs.bench.text`
(one home)."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "a photo of the cat dog red blue green small large on in with tree house car bird sky "
    "sea boat man woman child running sitting painting drawing bright dark"
).split()
BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"


def make_tokenizer(max_length: int = 16, pad: str = EOS, bos: bool = True):
    """A word-level tokenizer: [BOS] words [EOS], padded with ``pad`` (CLIP pads with EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([BOS, EOS, PAD, UNK, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 0), (EOS, 1)]
        )
    else:  # T5: no BOS, EOS appended
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", special_tokens=[(EOS, 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=pad, unk_token=UNK,
        model_max_length=max_length,
    )  # fmt: skip


def make_clip(folder: Path, *, projection: bool = False, hidden: int = 32, seed: int = 0,
              max_length: int = 16, tokenizer_folder: Path | None = None) -> Path:  # fmt: skip
    """A tiny CLIP text encoder (and its tokenizer, in ``tokenizer_folder`` or beside it)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(WORDS) + 4, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=max_length,
        projection_dim=hidden // 2 + 8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    cls(config).eval().save_pretrained(folder, safe_serialization=True)
    make_tokenizer(max_length).save_pretrained(tokenizer_folder or folder)
    return Path(folder)


def make_t5(folder: Path, *, d_model: int = 48, seed: int = 0, max_length: int = 24,
            tokenizer_folder: Path | None = None) -> Path:  # fmt: skip
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(WORDS) + 4, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
        num_heads=4, pad_token_id=2, eos_token_id=1, decoder_start_token_id=2,
    )  # fmt: skip
    T5EncoderModel(config).eval().save_pretrained(folder, safe_serialization=True)
    make_tokenizer(max_length, pad=PAD, bos=False).save_pretrained(tokenizer_folder or folder)
    return Path(folder)


def make_sdxl_root(root: Path) -> Path:
    """A diffusers-style pipeline root with text_encoder(_2) and tokenizer(_2) subfolders."""
    make_clip(root / "text_encoder", seed=1, tokenizer_folder=root / "tokenizer")
    make_clip(root / "text_encoder_2", projection=True, hidden=40, seed=2,
              tokenizer_folder=root / "tokenizer_2")  # fmt: skip
    return root


def make_sd3_root(root: Path) -> Path:
    """StableDiffusion3Pipeline's text side: CLIP-L and CLIP-G (both with projection, as SD3
    ships them) and a T5 whose width (80) exceeds the two CLIPs' (32 + 40), so the zero padding
    of the CLIP part is exercised."""
    make_clip(root / "text_encoder", projection=True, seed=1, tokenizer_folder=root / "tokenizer")
    make_clip(root / "text_encoder_2", projection=True, hidden=40, seed=2,
              tokenizer_folder=root / "tokenizer_2")  # fmt: skip
    make_t5(root / "text_encoder_3", d_model=80, seed=3, tokenizer_folder=root / "tokenizer_3")
    return root


def make_flux_root(root: Path) -> Path:
    """FluxPipeline's text side: a CLIPTextModel (its pooler output) and a T5 encoder."""
    make_clip(root / "text_encoder", seed=1, tokenizer_folder=root / "tokenizer")
    make_t5(root / "text_encoder_2", d_model=48, seed=2, tokenizer_folder=root / "tokenizer_2")
    return root
