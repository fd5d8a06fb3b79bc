"""The torch side of a T5 text encoder stage (SD3's text_encoder_3, Flux's
text_encoder_2): the export wrapper, its trace and check inputs, the tokenizer.json a
checkpoint with only spiece.model gets at export, and a tiny trained SentencePiece
tokenizer for tests and `diffrt demo`.

The stage's IO (families.t5.stage_io): `input_ids` int64 (batch, t5_length) ->
`last_hidden_state` float32 (batch, t5_length, d_model), as diffusers reads it
(`text_encoder_3(input_ids)[0]`, no attention mask). The sequence length is dynamic:
it is the request's `max_sequence_length`.
"""

from __future__ import annotations

import io
import logging
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from diffrt.errors import DiffrtError
from diffrt.export.sd import StageModule

logger = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
SPIECE_MODEL = "spiece.model"
# Traced at one length, checked at another: the exported graph must take any length.
TRACE_LENGTH, CHECK_LENGTH = 7, 11


class T5EncoderStage(torch.nn.Module):
    """T5EncoderModel -> last_hidden_state (after the final RMS norm)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        return self.encoder(input_ids=input_ids, return_dict=True).last_hidden_state


def t5_stage(encoder: torch.nn.Module, generator: torch.Generator, component: str) -> StageModule:
    """The T5 stage around a loaded T5EncoderModel: traced on two prompts of
    TRACE_LENGTH tokens, checked on one of CHECK_LENGTH (ending in </s>, id 1)."""
    vocab = int(encoder.config.vocab_size)

    def ids(batch: int, length: int) -> torch.Tensor:
        x = torch.randint(3, vocab, (batch, length), generator=generator)
        x[:, -1] = 1
        return x

    return StageModule(T5EncoderStage(encoder), (ids(2, TRACE_LENGTH),), {"input_ids": ids(1, CHECK_LENGTH)},
                       weights=encoder, component=component)


def t5_facts(config: Any, prefix: str) -> dict[str, Any]:
    """The T5 encoder's facts the runtime needs (its width), under `prefix` ("t5_")."""
    return {f"{prefix}hidden_size": int(config.d_model)}


# -- tokenizer ---------------------------------------------------------------------------

def ensure_tokenizer_json(folder: Path) -> None:
    """Give a copied T5 tokenizer folder a tokenizer.json when it has only spiece.model:
    transformers' own conversion (what its T5TokenizerFast builds from the
    SentencePiece model), so the runtime (diffrt.runtime.t5_tokenizer) reads the
    vocabulary and normalizer without sentencepiece. Needs sentencepiece and protobuf
    here, at export."""
    if (folder / TOKENIZER_JSON).is_file():
        return
    if not (folder / SPIECE_MODEL).is_file():
        raise DiffrtError(f"{folder} has neither {TOKENIZER_JSON} nor {SPIECE_MODEL}; a T5 tokenizer folder needs one")
    try:
        import sentencepiece  # noqa: F401 - transformers' converter reads the model with it
    except ImportError:
        raise DiffrtError(f"{folder} has only {SPIECE_MODEL}: converting it needs sentencepiece "
                          "(pip install sentencepiece, or install diffrt's export extra)") from None
    from transformers import T5TokenizerFast

    try:
        tokenizer = T5TokenizerFast.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DiffrtError(f"{folder / SPIECE_MODEL} cannot be read as a T5 SentencePiece model: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    tokenizer.backend_tokenizer.save(str(folder / TOKENIZER_JSON))
    logger.info("wrote %s from %s (transformers' conversion)", folder / TOKENIZER_JSON, SPIECE_MODEL)


# Words the tiny tokenizer is trained on (prompt-like text and characters that need the
# SentencePiece normalizer: accents, full-width forms, ligatures, CJK).
_TINY_WORDS = ("a photo of an astronaut riding a horse on mars cat dog red car painting oil castle tree lamp boat "
               "mountain lighthouse masterpiece highly detailed portrait landscape sunset city night blue green sky "
               "water forest flower bird the and with in on under over by for").split()
_TINY_EXTRA_LINES = ("café naïve crème brûlée Ångström 123 4567 3.14 !?,.;:'\"()", "ｆｕｌｌ ｗｉｄｔｈ ﬁ ligature ½",
                     "東京の夜景 北京 서울", "«quotes» “curly” — dash")


def train_tiny_spiece(seed: int = 0, vocab_size: int = 100) -> bytes:
    """A tiny SentencePiece Unigram model with T5's layout (<pad> 0, </s> 1, <unk> 2, no
    bos) and its default nmt_nfkc normalizer, trained on generated prompt-like text."""
    try:
        import sentencepiece as spm
    except ImportError:
        raise DiffrtError("a tiny T5 tokenizer is trained with sentencepiece: pip install sentencepiece "
                          "(part of diffrt's export extra)") from None
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_TINY_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000)]
    lines += list(_TINY_EXTRA_LINES) * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
                                   character_coverage=1.0, num_threads=1, minloglevel=2)
    return model.getvalue()


def write_tiny_t5_tokenizer(folder: str | Path, seed: int = 0, with_tokenizer_json: bool = True):
    """A tiny T5 tokenizer folder: spiece.model, and as transformers saves it
    (tokenizer.json, tokenizer_config.json with model_max_length 512, as SD3's and
    Flux's) unless `with_tokenizer_json` is False (a SentencePiece-only folder).
    Returns the transformers tokenizer."""
    from transformers import T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spiece = train_tiny_spiece(seed)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / SPIECE_MODEL).write_bytes(spiece)
        tokenizer = T5TokenizerFast.from_pretrained(tmp, model_max_length=512)
    if with_tokenizer_json:
        tokenizer.save_pretrained(folder)
    (folder / SPIECE_MODEL).write_bytes(spiece)
    return tokenizer


def tiny_t5_encoder(vocab_size: int, d_model: int = 32, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight T5EncoderModel of T5 v1.1's kind (gated GELU, no tied
    embeddings), as SD3's and Flux's T5-XXL."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=layers, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
    return T5EncoderModel(config).eval().requires_grad_(False)


__all__ = ["T5EncoderStage", "ensure_tokenizer_json", "t5_facts", "t5_stage", "tiny_t5_encoder",
           "train_tiny_spiece", "write_tiny_t5_tokenizer"]
