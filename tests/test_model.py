"""model.py against transformers' Qwen3ForCausalLM: the same checkpoint must give the same logits."""
import json
import os

import pytest
import torch

from conftest import CONFIGS, TOKENIZER_DIR, write_byte_tokenizer
from model import KVCache, LoadError, load_model, load_tokenizer

IDS = torch.randint(0, 1000, (3, 19), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32_logits_match_transformers(hf_models, name):
    path, hf = hf_models[name]
    model, _ = load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_left_padded_batch_matches_transformers_and_each_prompt_alone(hf_models, name):
    path, hf = hf_models[name]
    model, _ = load_model(path)
    mask = torch.ones_like(IDS)
    mask[0, :7] = 0
    mask[2, :1] = 0
    with torch.no_grad():
        ours, ref = model(IDS, mask), hf(IDS, attention_mask=mask).logits
        alone = model(IDS[:1, 7:])
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[0, 7:], alone[0], atol=1e-5, rtol=1e-5)


def test_bfloat16_logits_close_to_transformers(hf_models):
    # bf16 has 8 mantissa bits: both implementations round at the same places, so logits agree to about the
    # resolution of bf16 at their magnitude; the bound is 2e-2 absolute (logits here are O(1)).
    path, hf = hf_models["gqa_tied"]
    model, _ = load_model(path, dtype=torch.bfloat16)
    hf16 = type(hf).from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ours, ref = model(IDS).float(), hf16(IDS).logits.float()
    assert (ours - ref).abs().max() < 2e-2
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("name", list(CONFIGS))
def test_incremental_decoding_with_cache_equals_full_forward(hf_models, name):
    path, _ = hf_models[name]
    model, _ = load_model(path)
    mask = torch.ones_like(IDS, dtype=torch.bool)
    mask[1, :4] = False
    with torch.no_grad():
        full = model(IDS, mask)
        cache = KVCache.empty(model.config, 3, IDS.shape[1], "cpu", torch.float32)
        steps = [model(IDS[:, :10], mask[:, :10], cache=cache)]
        for t in range(10, IDS.shape[1]):   # every other step without a mask: the sampler's one-new-token path
            steps.append(model(IDS[:, t:t + 1], None if t % 2 else mask[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1)[mask], full[mask], atol=1e-5, rtol=1e-5)


def test_unpadded_batch_skips_the_mask_and_gets_the_same_numbers(hf_models):
    """No padding: prefill runs SDPA causal without a mask tensor, decoding without any mask. Rows 0 and 1 are
    the same in both batches below; the second batch pads row 2, which sends every row down the masked path."""
    model, _ = load_model(hf_models["gqa_tied"][0])
    padded = torch.ones_like(IDS, dtype=torch.bool)
    padded[2, :3] = False
    outs = []
    with torch.no_grad():
        for mask in (None, padded):
            cache = KVCache.empty(model.config, 3, IDS.shape[1], "cpu", torch.float32)
            steps = [model(IDS[:, :10], None if mask is None else mask[:, :10], cache=cache)]
            steps += [model(IDS[:, t:t + 1], cache=cache) for t in range(10, IDS.shape[1])]
            outs.append((model(IDS, mask), torch.cat(steps, 1)))
    for unmasked, masked in zip(*outs):
        assert torch.equal(unmasked[:2], masked[:2])


def test_graph_step_over_the_whole_cache_equals_a_decode_step(hf_models):
    """Qwen3.graph_step, the step a CUDA graph replays, attends to every slot of the cache (the unwritten ones
    masked) and writes at a slot given as a tensor; it must compute what the plain decode step computes."""
    model, _ = load_model(hf_models["gqa_tied"][0])
    mask = torch.ones_like(IDS, dtype=torch.bool)
    mask[1, :4] = False
    with torch.no_grad():
        plain, graph = (KVCache.empty(model.config, 3, IDS.shape[1], "cpu", torch.float32) for _ in range(2))
        for cache in (plain, graph):
            model(IDS[:, :10], mask[:, :10], cache=cache)
        positions = mask[:, :10].sum(-1, keepdim=True)
        for t in range(10, IDS.shape[1]):
            want = model(IDS[:, t:t + 1], cache=plain, positions=positions)[:, -1]
            got = model.graph_step(IDS[:, t:t + 1], positions, graph, torch.tensor([graph.length]))
            graph.length += 1
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
            positions = positions + 1
    assert torch.equal(graph.valid, plain.valid)
    torch.testing.assert_close(graph.k[1], plain.k[1], atol=1e-6, rtol=1e-6)   # a wider softmax rounds differently


def test_rope_theta_is_read_from_both_config_spellings(tmp_path, hf_models):
    path, hf = hf_models["mha_untied"]
    cfg = json.load(open(os.path.join(path, "config.json")))
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = theta  # the released Qwen3 configs' spelling
    for f in os.listdir(path):
        os.symlink(os.path.join(path, f), tmp_path / f) if f != "config.json" else None
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    model, _ = load_model(str(tmp_path))
    assert model.config.rope_theta == theta == 10_000.0
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_loads(tmp_path, hf_models):
    path, hf = hf_models["gqa_tied"]
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    write_byte_tokenizer(tmp_path)
    model, _ = load_model(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, atol=1e-5, rtol=1e-5)


def _copy_dir(src, dst):
    import shutil
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return str(dst)


def test_user_mistakes_are_one_line_errors(tmp_path, hf_models):
    path, _ = hf_models["gqa_tied"]
    with pytest.raises(LoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(LoadError, match="no config.json"):
        load_model(str(tmp_path))
    bad = _copy_dir(path, tmp_path / "llama")
    cfg = json.load(open(f"{bad}/config.json"))
    json.dump({**cfg, "model_type": "llama"}, open(f"{bad}/config.json", "w"))
    with pytest.raises(LoadError, match="model_type is 'llama'"):
        load_model(bad)
    wide = _copy_dir(path, tmp_path / "wide")
    json.dump({**cfg, "intermediate_size": 130}, open(f"{wide}/config.json", "w"))
    with pytest.raises(LoadError, match=r"layers.0.mlp.gate_proj.weight: copying a param with shape torch.Size"
                       r"\(\[128, 64\]\) from checkpoint, the shape in current model is torch.Size\(\[130, 64\]\)"):
        load_model(wide)
    deep = _copy_dir(path, tmp_path / "deep")
    json.dump({**cfg, "num_hidden_layers": 3}, open(f"{deep}/config.json", "w"))
    with pytest.raises(LoadError, match=r"Missing key\(s\) in state_dict: \"layers.2"):
        load_model(deep)
    small = _copy_dir(path, tmp_path / "small")
    json.dump({**cfg, "vocab_size": 200}, open(f"{small}/config.json", "w"))
    with pytest.raises(LoadError, match="shape"):
        load_model(small)


def test_missing_bundled_tiny_model_says_how_to_make_it(monkeypatch, tmp_path):
    import model
    monkeypatch.setitem(model.BUNDLED, "tiny", str(tmp_path / "absent"))
    with pytest.raises(LoadError, match=r"python -m tiny.world && python -m tiny.pretrain"):
        load_model("tiny")


def test_hub_id_offline_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError, match="pass a local model directory"):
        load_model("Qwen/Qwen3-0.6B-Base")


def test_hub_id_resolves_through_snapshot_download(monkeypatch, hf_models):
    import huggingface_hub
    path, hf = hf_models["gqa_tied"]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: path)
    model, tok = load_model("Qwen/Qwen3-0.6B-Base")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, atol=1e-5, rtol=1e-5)


def test_tokenizer_larger_than_embedding_is_refused(tmp_path, hf_models):
    path, _ = hf_models["gqa_tied"]
    d = _copy_dir(path, tmp_path / "m")
    import shutil
    shutil.copy(os.path.join(TOKENIZER_DIR, "tokenizer.json"), d)
    with pytest.raises(LoadError, match="tokenizer has 151669 tokens but the embedding only 1000 rows"):
        load_model(d)


def test_real_qwen_tokenizer_reproduces_known_ids():
    tok = load_tokenizer(TOKENIZER_DIR)
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("<|im_start|>user\n") == [151644, 872, 198]
    assert tok.encode("\n\n") == [271]
    assert tok.encode("<think>\n\n</think>\n\n") == [151667, 271, 151668, 271]
    assert tok.eos_ids == [151643] and tok.pad_id == 151643  # from tokenizer_config.json: "<|endoftext|>"
    text = "Question: Natalia sold 48 clips in April.\nAnswer: 48 / 2 = 24\n#### 72"
    assert tok.decode(tok.encode(text)) == text
