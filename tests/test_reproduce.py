"""reproduce.py: a shortened study on the bundled tiny world writes Table 2, reuses finished stages and resumes
an interrupted run; the paper's predictions are judged by the criteria they state."""
import json
import os

import pytest
import torch

import reproduce
import training


def ms(mean, std=0.0):
    return {"mean": mean, "std": std, "n": 1, "values": [mean]}


def test_predictions_follow_their_stated_criteria():
    models = {
        "sft_mild": {"retention": ms(0.99), "gsm8k": ms(0.5)},
        "sft_stress": {"retention": ms(0.80), "gsm8k": ms(0.40),
                       "drift_lexical": {"mmd2": ms(0.0110), "mmd2_bootstrap_std": ms(0.0004)}},
        "opd_stress": {"retention": ms(0.97), "gsm8k": ms(0.46),
                       "drift_lexical": {"mmd2": ms(0.0109), "mmd2_bootstrap_std": ms(0.0003)}},
        "grpo": {"retention": ms(1.01), "gsm8k": ms(0.47)},
    }
    p = reproduce.predictions(models)
    assert p["P1"]["holds"] and p["P2"]["holds"] and p["P3"]["holds"] and p["P4_lexical"]["holds"]
    models["sft_mild"]["retention"] = ms(0.90)        # mild SFT forgets too: P1 fails
    models["grpo"]["retention"] = ms(0.93)            # GRPO forgets: P2 fails
    models["opd_stress"]["gsm8k"] = ms(0.39)          # the student stays below its teacher: P3 fails
    models["opd_stress"]["drift_lexical"]["mmd2"] = ms(0.0200)   # clearly different drift: P4 fails
    p = reproduce.predictions(models)
    assert not any(v["holds"] for v in p.values())


def test_mean_std_over_seeds_skips_missing_values():
    assert reproduce.mean_std([]) is None
    v = reproduce.mean_std([0.4, None, 0.6])
    assert v["mean"] == pytest.approx(0.5) and v["std"] == pytest.approx(0.1414, abs=1e-4) and v["n"] == 2


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """The whole study, shortened (--quick), on the bundled tiny world."""
    out = str(tmp_path_factory.mktemp("study"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # the CI machine has two cores
    try:
        summary = reproduce.main(["--model", "tiny", "--quick", "--out", out, "--device", "cpu"])
    finally:
        torch.set_num_threads(n)
    return out, summary


def test_quick_study_writes_table_2_with_every_model(quick_study):
    out, summary = quick_study
    names = ["base"] + [s.name for s in reproduce.stages()]
    assert list(summary["models"]) == names
    for name in names[1:]:
        row = summary["models"][name]
        assert not row["failed"], (name, row["failed"])
        for key in ("gsm8k", "truthfulqa", "mmlu", "forgetting", "retention"):
            assert row[key] is not None and row[key]["n"] == 1, (name, key)
        assert row["drift_lexical"]["mmd2"] is not None and row["drift_hidden"]["mmd2"] is not None
        assert row["locality"]["state_nll_base"]["mean"] > 0   # every trainer logged state locality
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "## Table 2" in md and "(0.448)" in md and "OPD signal on teacher states" in md
    assert os.path.exists(os.path.join(out, "training_curves.png"))
    assert os.path.exists(os.path.join(out, "retention_vs_drift.png"))
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["models"]["sft_stress"]["label"] == "SFT stress"
    # OPD was called with nothing but its teacher's checkpoint (base model and data from its metadata)
    argv = summary["models"]["opd_stress"]["runs"][0]["argv"]
    assert "--model" not in argv and "--data-dir" not in argv and "--teacher" in argv


def test_a_second_invocation_reuses_every_finished_stage(quick_study):
    out, first = quick_study
    again = reproduce.main(["--model", "tiny", "--quick", "--out", out, "--device", "cpu"])
    assert again["costs"]["seconds"] == {}
    assert again["models"]["grpo"]["gsm8k"] == first["models"]["grpo"]["gsm8k"]


def test_an_interrupted_run_is_resumed_not_restarted(tmp_path):
    out = str(tmp_path)
    stop = ["--model", "tiny", "--quick", "--out", out, "--only", "sft_mild", "--features", "lexical",
            "--extra", "train_sft.py=--max-steps 4 --stop-after 2 --save-every 1"]
    first = reproduce.main(stop)
    assert "stopped before its last step" in first["models"]["sft_mild"]["runs"][0]["failed"]
    ckpt = torch.load(first["models"]["sft_mild"]["runs"][0]["checkpoint"], weights_only=True)
    assert ckpt["train_state"]["step"] == 2 and not training.finished(ckpt)
    second = reproduce.main([a.replace(" --stop-after 2", "") for a in stop])
    run = second["models"]["sft_mild"]["runs"][0]
    assert "--resume" in run["argv"] and "failed" not in run
    log = reproduce._log(run["log"])
    assert [r["step"] for r in log] == [1, 2, 3, 4]     # steps 1-2 from the first call, 3-4 resumed


def test_only_refuses_unknown_runs_and_students_without_their_teacher(tmp_path):
    base = ["--model", "tiny", "--quick", "--out", str(tmp_path), "--only"]
    with pytest.raises(reproduce.LoadError, match="no run named sft"):
        reproduce.main(base + ["sft"])
    with pytest.raises(reproduce.LoadError, match="opd_stress learns from sft_stress"):
        reproduce.main(base + ["opd_stress"])
    assert not os.path.exists(os.path.join(tmp_path, "eval"))   # refused before any stage ran


def test_a_checkpoint_written_on_a_gpu_is_read_on_a_cpu_only_machine(tiny_dir, tmp_path, monkeypatch):
    from lora import LoraConfig, add_lora, save_checkpoint
    from model import load_model
    model, _ = load_model(tiny_dir)
    add_lora(model, LoraConfig(r=2))
    path = str(tmp_path / "gpu.pt")
    with monkeypatch.context() as m:   # what torch.save writes for tensors that live on a GPU (the optimizer's state)
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_checkpoint(path, model, {"method": "sft"}, train_state={"step": 2, "total_steps": 4,
                                                                      "optimizer": {"exp_avg": torch.ones(3)}})
    assert not torch.cuda.is_available()
    assert reproduce._finished(path) is False
