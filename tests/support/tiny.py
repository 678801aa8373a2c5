"""Tiny random-weight Hugging Face models of each supported family, built offline (no hub access).

The same recipe as the user-reported cases (`make_tiny.py`): a ~600-token tokenizer trained on
`data/prose.txt`, two layers of width 64, and randomised norm gains so that folding them matters
(Gemma stores its gain as an offset from one, so its raw gains are drawn around 0).

FAMILIES: gpt2 (LayerNorm, MHA), llama-gqa (RMSNorm, 4 query heads on 2 KV heads), gemma (`1 + w`
RMSNorm, GQA), gemma2 (`1 + w` RMSNorm with post-attention and post-MLP "sandwich" norms, logit
soft-capping), neox (LayerNorm, parallel attention + MLP, partial rotary).
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("gpt2", "llama-gqa", "gemma", "gemma2", "neox")
PROSE = Path(__file__).parent / "data" / "prose.txt"


def build_tokenizer(kind: str = "bytelevel", bos: bool = True):
    """A small BPE tokenizer trained on `data/prose.txt`: byte-level (GPT-2 style, `Ġ`) or Llama-2
    style SentencePiece (`▁` marks a word start, byte fallback, the decoder strips one leading space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = PROSE.read_text()
    if kind == "bytelevel":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.train_from_iterator([text] * 3, trainers.BpeTrainer(
            vocab_size=600, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>" if bos else None,
                                       eos_token="<|eos|>", pad_token="<|pad|>")
    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.train_from_iterator([text] * 3, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>" if bos else None, eos_token="</s>",
                                   unk_token="<unk>")


def build_model(arch: str, tok):
    import transformers as T

    torch.manual_seed(0)
    V = len(tok)
    common = dict(vocab_size=V, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    gqa = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
    if arch == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    elif arch == "llama-gqa":
        m = T.LlamaForCausalLM(T.LlamaConfig(tie_word_embeddings=False, **gqa, **common))
    elif arch == "gemma":
        m = T.GemmaForCausalLM(T.GemmaConfig(head_dim=16, **gqa, **common))
    elif arch == "gemma2":
        m = T.Gemma2ForCausalLM(T.Gemma2Config(head_dim=16, sliding_window=8, **gqa, **common))
    elif arch == "neox":
        m = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                                 num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True,
                                                 tie_word_embeddings=False, **common))
    else:
        raise ValueError(f"unknown family {arch}")
    with torch.no_grad():  # random norm gains (Gemma stores its gain as an offset from 1, so around 0 there)
        for mod in m.modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 1 and "norm" in type(mod).__name__.lower():
                w.copy_((0.0 if arch.startswith("gemma") else 1.0) + 0.5 * torch.randn_like(w))
            b = getattr(mod, "bias", None)
            if isinstance(b, torch.Tensor) and b.dim() == 1:
                b.copy_(0.1 * torch.randn_like(b))  # biases matter for the decomposition's constant terms
    return m.eval()


def make_tiny(arch: str, directory: Path, tok: str = "bytelevel", tokenizer: bool = True, bos: bool = True) -> Path:
    """Write a tiny `arch` model (and its tokenizer unless `tokenizer=False`) with `save_pretrained`."""
    t = build_tokenizer(tok, bos=bos)
    m = build_model(arch, t)
    directory = Path(directory)
    m.save_pretrained(directory, safe_serialization=True)
    if tokenizer:
        t.save_pretrained(directory)
    return directory
