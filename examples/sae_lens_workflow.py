"""SAE-Lens workflow: an SAE you trained, attached to a HookedSAETransformer, through the same pipeline.

What it shows
    1. the embedded SmolLM2-135M-Instruct as a SAE-Lens `HookedSAETransformer` (built offline from the
       GGUF that ships with the package; folded weights, as `HookedTransformer.from_pretrained` gives);
    2. a small SAE-Lens `StandardSAE` on the residual stream after block LAYER, trained here for a
       hundred-odd steps on cached activations (MSE + L1, a few seconds on a CPU; a real SAE would come from
       `SAE.from_pretrained(release, sae_id)` or SAE-Lens's trainer);
    3. `model.add_sae(sae)` as in any SAE-Lens notebook, then `sae_lens_ctx.run(model, ...)`: the attached
       SAE's latents are the units (found by congruence, mined, attributed to heads, explained, scored),
       used in memory; no SAE file is written, and the SAE is attached again when the run returns;
    4. the results as Neuronpedia-shaped rows and as {latent index: explanation}, keyed by the SAE's
       SAE-Lens metadata (release, sae_id, hook_name, neuronpedia_id).

Run it
    python examples/sae_lens_workflow.py [OUT_DIR]      # about two minutes on 2 CPU cores
"""

import sys
import tempfile

import torch
from sae_lens import HookedSAETransformer, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformerConfig
from transformer_lens.loading_from_pretrained import convert_hf_model_config
from transformer_lens.pretrained.weight_conversions import convert_llama_weights
from transformers import AutoModelForCausalLM, AutoTokenizer

import sae_lens_ctx as slc
from sae_lens_ctx.inputs.corpus import embedded_documents
from sae_lens_ctx.core.embedded import embedded_gguf_path

LAYER = 12  # mid-depth of 30 layers: mining and attribution stop at the SAE's layer
HOOK = f"blocks.{LAYER}.hook_resid_post"
torch.manual_seed(0)


def embedded_hooked_sae_transformer() -> HookedSAETransformer:
    """SmolLM2-135M-Instruct from the packaged GGUF as a HookedSAETransformer, offline."""
    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:  # TransformerLens reads a Llama config from a local directory
        hf.config.architectures = ["LlamaForCausalLM"]
        hf.config.save_pretrained(d)
        fields = convert_hf_model_config(d)
    fields.update(n_ctx=2048, device="cpu", dtype=torch.float32)
    cfg = HookedTransformerConfig(**{k: v for k, v in fields.items() if k in HookedTransformerConfig.__dataclass_fields__})
    model = HookedSAETransformer(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=True, center_writing_weights=False,
                                      center_unembed=True)
    return model.eval()


def cached_activations(model, n_docs: int = 32, n_tokens: int = 48) -> torch.Tensor:
    texts = [d.text for _, d in zip(range(n_docs), embedded_documents())]
    acts = []
    with torch.no_grad():
        for i in range(0, len(texts), 16):
            tokens = model.to_tokens(texts[i:i + 16])[:, :n_tokens]
            _, cache = model.run_with_cache(tokens, names_filter=HOOK, stop_at_layer=LAYER + 1)
            acts.append(cache[HOOK][:, 1:].reshape(-1, model.cfg.d_model))  # BOS excluded
    return torch.cat(acts)


def train_sae(acts: torch.Tensor, d_sae: int = 256, steps: int = 150, l1: float = 3e-3) -> StandardSAE:
    sae = StandardSAE(StandardSAEConfig(
        d_in=acts.shape[1], d_sae=d_sae, normalize_activations="none", apply_b_dec_to_input=True,
        metadata=SAEMetadata(hook_name=HOOK, model_name="SmolLM2-135M-Instruct", release="example-smollm2-res",
                             sae_id=f"{LAYER}-res-{d_sae}", neuronpedia_id=f"smollm2-135m/{LAYER}-res-{d_sae}")))
    with torch.no_grad():  # init: decoder rows of unit norm, encoder = decoder transposed, b_dec = mean
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(d_sae, acts.shape[1]), dim=-1))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(acts.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=2e-3)
    scale = acts.var(0).sum()
    for step in range(steps):
        batch = acts[torch.randint(len(acts), (256,))]
        feats = sae.encode(batch)
        mse = (sae.decode(feats) - batch).pow(2).sum(-1).mean() / scale
        loss = mse + l1 * (feats * sae.W_dec.norm(dim=-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        feats = sae.encode(acts)
        fvu = ((sae.decode(feats) - acts).pow(2).sum(-1).mean() / scale).item()
    print(f"trained SAE {sae.cfg.metadata.sae_id} on {len(acts)} activations: FVU {fvu:.3f}, "
          f"L0 {(feats > 0).float().sum(-1).mean():.1f}")
    return sae


model = embedded_hooked_sae_transformer()
sae = train_sae(cached_activations(model))
model.add_sae(sae)  # as in any SAE-Lens notebook

config = slc.RunConfig(
    corpus=slc.CorpusConfig(context_size=32, max_tokens=2000, test_fraction=0.35),
    discover=slc.DiscoverConfig(neurons=False, top_k=1, controls=False),  # the best latent; more: top_k
    mine=slc.MineConfig(top_k=6, n_test_prompts=3, n_random=2),
    attribute=slc.AttributeConfig(n_prompts=6, rule="top3"),
    explain=slc.ExplainConfig(n_active=2, n_inactive=2, unit_n_top=2, max_tokens=32),
    score=slc.ScoreConfig(n_prompts=3, bootstrap_resamples=200, shuffled_control=False),
)
out = sys.argv[1] if len(sys.argv) > 1 else None
result = slc.run(model, config=config, out=out)  # corpus=None: the embedded corpus

units = result.units.to_pandas()
print("\n== next-token latents of the attached SAE ==")
print(units[["unit_id", "index", "token", "congruence", "sae_release", "neuronpedia_id"]].to_string(index=False))
heads = result.heads.to_pandas()
print("\n== relevant heads per latent ==")
print(heads[heads.relevant][["unit_id", "head", "active_fraction", "mean_attribution"]].to_string(index=False))
explained = slc.latent_explanations(result)
print("\n== explanation per latent (SAE-Lens / Neuronpedia shape) ==")
for index, text in explained.items():
    print(f"  latent {index}: {text.strip()[:100]!r}")
rows = slc.to_neuronpedia(result)
print(rows[0])

# The example checks its own output.
assert set(units.kind) == {"sae_latent"} and len(units) == 1
assert set(units.sae_id) == {f"example-smollm2-res/{LAYER}-res-256"} and set(units.hook_name) == {HOOK}
assert set(units.neuronpedia_id) == {f"smollm2-135m/{LAYER}-res-256"}
assert list(model.acts_to_saes) == [HOOK], "the SAE is attached again after the run"
assert all(s.startswith("object:") for s in result.config.discover.saes)  # used in memory, no file
assert not list(result.out.rglob("cfg.json")), "no SAE was written to disk"
# mining used the SAE itself: re-encode the top train prompt of the best latent and compare
best = units.sort_values("congruence", ascending=False).iloc[0]
top = next(c for c in result.contexts if c.unit_id == best.unit_id and c.split == "train" and c.kind == "top")
with torch.no_grad():
    _, cache = model.run_with_cache(torch.tensor([[model.tokenizer.bos_token_id, *top.tokens]]))
    again = cache[f"{HOOK}.hook_sae_acts_post"][0, -1, int(best["index"])].item()
assert abs(again - top.trimmed_activation) < 1e-3 * max(1.0, abs(again)), (again, top.trimmed_activation)
assert set(heads.unit_id) == set(units.unit_id)
assert explained and set(explained) <= set(units["index"]) and all(isinstance(t, str) for t in explained.values())
assert rows[0]["modelId"] == "smollm2-135m" and rows[0]["layer"] == f"{LAYER}-res-256"
print("sae_lens_workflow: OK")
