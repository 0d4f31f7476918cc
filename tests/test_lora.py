"""lora.py: a fresh adapter is a no-op, merging is exact, the base is the reference, checkpoints round-trip."""
import os

import pytest
import torch

from export import export_merged, export_peft
from lora import (LoraConfig, add_lora, load_adapter, load_checkpoint, lora_parameters, merged, save_checkpoint,
                  use_adapter)
from model import LoadError, load_model

IDS = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(0))


def trained_adapter(model, cfg=LoraConfig(r=4, alpha=8, dropout=0.0), name="default", seed=0):
    add_lora(model, cfg, name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer_param in lora_parameters(model, name):
            layer_param.copy_(torch.randn(layer_param.shape, generator=g) * 0.05)
    return model


def test_fresh_adapter_changes_nothing(tiny_dir):
    model, _ = load_model(tiny_dir)
    with torch.no_grad():
        before = model(IDS)
        add_lora(model, LoraConfig())
        torch.testing.assert_close(model(IDS), before, atol=0, rtol=0)


def test_only_adapter_parameters_train(tiny_dir):
    model, _ = load_model(tiny_dir)
    add_lora(model, LoraConfig(r=4, targets=("q_proj", "v_proj")))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    assert len(trainable) == 2 * 2 * model.config.num_hidden_layers


def test_merged_equals_unmerged_and_unmerge_restores_base_exactly(tiny_dir):
    model, _ = load_model(tiny_dir)
    base_w = model.layers[0].self_attn.q_proj.weight.clone()
    trained_adapter(model)
    with torch.no_grad():
        unmerged = model(IDS)
        with merged(model):
            merged_logits = model(IDS)
        after = model(IDS)
    torch.testing.assert_close(merged_logits, unmerged, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, unmerged)
    assert torch.equal(model.layers[0].self_attn.q_proj.base.weight, base_w)


def test_disabled_adapter_is_the_base_policy(tiny_dir):
    model, _ = load_model(tiny_dir)
    with torch.no_grad():
        base = model(IDS)
        trained_adapter(model)
        assert not torch.allclose(model(IDS), base)
        with use_adapter(model, None):
            assert torch.equal(model(IDS), base)


def test_two_adapters_share_one_base(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir)
    trained_adapter(model, seed=1)
    save_checkpoint(str(tmp_path / "teacher.pt"), model, {"method": "sft"})
    with torch.no_grad():
        teacher_logits = model(IDS)
    student, _ = load_model(tiny_dir)
    add_lora(student, LoraConfig(r=2, alpha=4))
    load_adapter(student, str(tmp_path / "teacher.pt"), name="teacher")
    with torch.no_grad():
        student_logits = student(IDS)
        with use_adapter(student, "teacher"):
            torch.testing.assert_close(student(IDS), teacher_logits, atol=1e-6, rtol=1e-6)
        assert torch.equal(student(IDS), student_logits)  # the student is active again
    assert all("teacher" not in n for n, p in student.named_parameters() if p.requires_grad)


def test_checkpoint_round_trip_and_metadata(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir)
    trained_adapter(model)
    path = str(tmp_path / "x.pt")
    save_checkpoint(path, model, {"method": "sft", "args": {"lr": 1e-4}, "step": 7}, train_state={"epoch": 1})
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["meta"]["method"] == "sft" and ckpt["meta"]["step"] == 7 and ckpt["meta"]["base_model"] == tiny_dir
    assert ckpt["lora"]["r"] == 4 and ckpt["train_state"] == {"epoch": 1}
    fresh, _ = load_model(tiny_dir)
    load_adapter(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), model(IDS), atol=0, rtol=0)


def test_checkpoint_of_another_base_is_refused(tiny_dir, hf_models, tmp_path):
    model, _ = load_model(tiny_dir)
    trained_adapter(model)
    save_checkpoint(str(tmp_path / "x.pt"), model, {"method": "sft"})
    other, _ = load_model(hf_models["mha_untied"][0])
    with pytest.raises(LoadError, match="checkpoint was trained on"):
        load_adapter(other, str(tmp_path / "x.pt"))
    with pytest.raises(LoadError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_peft_export_loads_in_peft_with_equal_logits(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import Qwen3ForCausalLM
    model, _ = load_model(tiny_dir)
    trained_adapter(model, LoraConfig(r=4, alpha=16, dropout=0.0, targets=("q_proj", "o_proj", "up_proj")))
    export_peft(model, str(tmp_path / "peft"))
    hf = peft.PeftModel.from_pretrained(Qwen3ForCausalLM.from_pretrained(tiny_dir), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS), atol=1e-5, rtol=1e-5)


def test_merged_export_is_a_transformers_model_with_equal_logits(tiny_dir, tmp_path):
    from transformers import Qwen3ForCausalLM
    model, _ = load_model(tiny_dir)
    trained_adapter(model)
    export_merged(model, tiny_dir, str(tmp_path / "merged"))
    hf = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    ours, _ = load_model(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(IDS), model(IDS), atol=1e-5, rtol=1e-5)


def test_new_adapter_layers_take_the_models_mode(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir)                     # eval mode
    trained_adapter(model, LoraConfig(r=4, alpha=8, dropout=0.5))
    save_checkpoint(str(tmp_path / "x.pt"), model, {"method": "sft"})
    with torch.no_grad():
        assert torch.equal(model(IDS), model(IDS))      # no adapter dropout on an eval-mode model
    fresh, _ = load_model(tiny_dir)
    load_adapter(fresh, str(tmp_path / "x.pt"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), model(IDS), atol=0, rtol=0)
    training, _ = load_model(tiny_dir)
    add_lora(training.train(), LoraConfig(r=4))
    assert all(m.training for m in training.modules())


def test_merged_export_of_adapters_with_different_targets(tiny_dir, tmp_path):
    from transformers import Qwen3ForCausalLM
    model, _ = load_model(tiny_dir)
    trained_adapter(model)                                                      # all seven projections
    trained_adapter(model, LoraConfig(r=2, alpha=4, dropout=0.0, targets=("q_proj", "v_proj")), "teacher", seed=1)
    for name in ("default", "teacher"):
        export_merged(model, tiny_dir, str(tmp_path / name), name=name)
        hf = Qwen3ForCausalLM.from_pretrained(str(tmp_path / name)).eval()
        with torch.no_grad(), use_adapter(model, name):
            torch.testing.assert_close(hf(IDS).logits, model(IDS), atol=1e-5, rtol=1e-5)


def test_the_export_command_writes_what_peft_and_transformers_load_with_our_logits(tiny_dir, tmp_path):
    """Issue 28: `python lora.py export CKPT --peft DIR --merged DIR` on a trainer's checkpoint."""
    import subprocess
    import sys
    peft = pytest.importorskip("peft")
    from transformers import Qwen3ForCausalLM
    model, _ = load_model(tiny_dir)
    trained_adapter(model, LoraConfig(r=4, alpha=16, dropout=0.0, targets=("q_proj", "v_proj", "down_proj")))
    save_checkpoint(str(tmp_path / "run.pt"), model, {"method": "sft"})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "lora.py"), "export", str(tmp_path / "run.pt"),
                        "--peft", str(tmp_path / "peft"), "--merged", str(tmp_path / "merged")],
                       capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr
    merged = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    adapted = peft.PeftModel.from_pretrained(Qwen3ForCausalLM.from_pretrained(tiny_dir), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, model(IDS), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapted(IDS).logits, model(IDS), atol=1e-5, rtol=1e-5)
    r = subprocess.run([sys.executable, os.path.join(root, "lora.py"), "export", str(tmp_path / "run.pt")],
                       capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: say where")
