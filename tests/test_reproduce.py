"""reproduce.py: a shortened study on the bundled tiny world writes Table 2 (the paper's five runs by default, the
variants and pass@k with --variants), gives the same numbers with its stages side by side (--jobs), reuses finished
stages and resumes an interrupted run (the statistics it reports: tests/test_study.py)."""
import argparse
import glob
import json
import os
import shutil

import pytest
import torch

import reproduce
import training
from model import LoadError
from study import stages
from study.stats import MEASURES
from study.summary import read_log as read_jsonl
from study.summary import read_log


QUICK = ["--model", "tiny", "--quick", "--device", "cpu"]
WHOLE = QUICK + ["--variants", "--frontier", "--jobs", "2"]


def one_thread(argv):
    """reproduce.main on one CPU thread (the CI machine has two cores; --jobs 2's workers have one each)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reproduce.main(argv)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """The whole study with every variant, shortened (--quick), two stages at a time, on the bundled tiny world."""
    out = str(tmp_path_factory.mktemp("study"))
    return out, one_thread(WHOLE + ["--out", out])


def test_quick_study_writes_table_2_with_every_model(quick_study):
    out, summary = quick_study
    names = ["base"] + [s.name for s in stages.stages()]
    assert list(summary["models"]) == names
    for name in names[1:]:
        row = summary["models"][name]
        assert not row["failed"], (name, row["failed"])
        for key in ("gsm8k", "truthfulqa", "mmlu", "forgetting", "retention"):
            assert row[key] is not None and row[key]["n"] == 1, (name, key)
        assert row["drift_lexical"]["mmd2"] is not None and row["drift_hidden"]["mmd2"] is not None
        assert row["locality"]["state_nll_base"]["mean"] > 0   # every trainer logged state locality
        if name != "base":   # --eval-every 1: validation accuracy after every step, drawn in training_curves.png
            logs = [read_jsonl(r["log"]) for r in row["runs"]]
            assert logs and all(log and all("val_accuracy" in line for line in log) for log in logs), name
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "## Table 2" in md and "(0.448)" in md and "OPD signal on teacher states" in md
    assert os.path.exists(os.path.join(out, "training_curves.png"))
    assert os.path.exists(os.path.join(out, "retention_vs_drift.png"))
    # the intervals, the policy KLs and their correlations with forgetting, the frontier
    for name in names[1:]:
        iv = summary["models"][name]["intervals"]
        assert all(iv[k]["ci95"][0] <= iv[k]["ci95"][1] for k in ("gain_gsm8k", "gain_mmlu", "forgetting", "retention"))
        assert set(summary["models"][name]["measures"]) == set(MEASURES)
        curve = summary["frontier"]["curves"][name]
        assert curve["fractions"] == [0.0, *stages.FRONTIER, 1.0]
        assert len(curve["retention"]) == len(stages.FRONTIER) + 2
    assert set(summary["correlations"]) == set(MEASURES) and len(summary["points"]) == len(names) - 1
    assert os.path.exists(os.path.join(out, "ckpt", "sft_stress_s0_at2.pt"))   # --snapshots 1/16..3/4 of 3 steps: 1, 2
    assert {p["verdict"] for p in summary["predictions"].values()} <= {"holds", "contradicted", "undecided"}
    assert set(summary["conditions"]) == {"C1", "C2", "C3", "C3b", "C4"} and "**C3b**" in md
    assert "## Differences from the base" in md and "## Policy KL" in md and "**P3**" in md
    # pass@k of every model (2 samples: k = 1, 2) with the difference from the base; the state-source x signal grid
    assert set(summary["models"]["base"]["pass_at_k"]) == {"1", "2"} and "## pass@k on GSM8K" in md
    assert all(set(summary["models"][n]["pass_intervals"]) == {"gsm8k_pass@1", "gsm8k_pass@2"} for n in names[1:])
    assert "## The two axes: state source x signal" in md and "| learner |" in md and "sampled KL" in md
    assert os.path.exists(os.path.join(out, "frontier.png"))
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["models"]["sft_stress"]["label"] == "SFT stress"
    # OPD was called with nothing but its teacher's checkpoint (base model and data from its metadata)
    argv = summary["models"]["opd_stress"]["runs"][0]["argv"]
    assert "--model" not in argv and "--data-dir" not in argv and "--teacher" in argv


def test_the_default_study_is_the_papers_five_runs_and_two_jobs_give_the_same_numbers_as_one(tmp_path):
    one, two = (one_thread(QUICK + ["--jobs", jobs, "--out", str(tmp_path / jobs)]) for jobs in ("1", "2"))
    assert list(one["models"]) == ["base", "sft_mild", "sft_stress", "grpo", "opd_stress"]
    # every condition and prediction needs only these runs; pass@k and the state-source contrasts need --variants
    assert set(one["conditions"]) == {"C1", "C2", "C3", "C3b", "C4"}
    assert {"P1", "P2", "P3"} <= set(one["predictions"]) and any(k.startswith("P4 ") for k in one["predictions"])
    assert "pass_at_k" not in one["models"]["base"] and not one["state_sources"]
    assert not any(f.endswith("_passk.json") for f in os.listdir(tmp_path / "1" / "eval"))
    with open(tmp_path / "2" / "results.md") as f:
        assert "Not run: `reproduce.py --variants` runs it." in f.read()
    for result in (one, two):
        del result["costs"]           # the seconds differ; every other number is the same with --jobs 1 and 2
    assert json.dumps(one).replace(str(tmp_path / "1"), "OUT") == json.dumps(two).replace(str(tmp_path / "2"), "OUT")


def test_a_second_invocation_reuses_every_finished_stage(quick_study):
    out, first = quick_study
    ckpt = os.path.join(out, "ckpt", "grpo_s0.pt")
    mtime = os.path.getmtime(ckpt)
    os.remove(os.path.join(out, "results.json"))   # as if the first process had been killed before its report
    again = reproduce.main(WHOLE + ["--out", out])
    assert again["costs"] == first["costs"] and os.path.getmtime(ckpt) == mtime   # nothing ran; costs as measured
    assert again["models"]["grpo"]["gsm8k"] == first["models"]["grpo"]["gsm8k"]


def test_a_study_without_its_checkpoints_reuses_its_stages_by_their_receipts(tmp_path, capsys):
    """What a committed study keeps (stage outputs, logs, records; no checkpoints, no rollouts) reports again, on
    another machine, without training anything; a stage still to run asks for the checkpoint it reads."""
    base = QUICK + ["--jobs", "1", "--out", str(tmp_path), "--only", "sft_mild", "--features", "lexical", "--frontier"]
    first = reproduce.main(base)
    for p in glob.glob(os.path.join(tmp_path, "ckpt", "*_at*.pt")):   # the snapshots gone, the final adapter kept
        os.remove(p)
    assert reproduce.main(base)["frontier"] == first["frontier"]
    for p in glob.glob(os.path.join(tmp_path, "ckpt", "*.pt")):
        os.remove(p)
    shutil.rmtree(os.path.join(tmp_path, "rollouts"))
    capsys.readouterr()
    again = reproduce.main(base)
    assert "\n== " not in capsys.readouterr().out and again["costs"] == first["costs"]    # every stage reused
    assert again["models"]["sft_mild"]["gsm8k"] == first["models"]["sft_mild"]["gsm8k"]
    assert again["frontier"] == first["frontier"]
    with pytest.raises(LoadError, match="sft_mild_s0.pt"):    # pass@k was never run: it needs the checkpoint
        reproduce.main(base + ["--variants"])


def test_an_interrupted_run_is_resumed_not_restarted(tmp_path):
    out = str(tmp_path)
    stop = QUICK + ["--jobs", "1", "--out", out, "--only", "sft_mild", "--features", "lexical",
            "--extra", "train_sft.py=--max-steps 4 --stop-after 2 --save-every 1"]
    first = reproduce.main(stop)
    assert "stopped before its last step" in first["models"]["sft_mild"]["runs"][0]["failed"]
    ckpt = torch.load(first["models"]["sft_mild"]["runs"][0]["checkpoint"], weights_only=True)
    assert ckpt["train_state"]["step"] == 2 and not training.finished(ckpt)
    second = reproduce.main([a.replace(" --stop-after 2", "") for a in stop])
    run = second["models"]["sft_mild"]["runs"][0]
    assert "--resume" in run["argv"] and "failed" not in run
    key = "train/sft_mild_s0"      # the run's cost: both invocations' seconds
    assert second["costs"]["seconds"][key] > first["costs"]["seconds"][key] > 0
    log = read_log(run["log"])
    assert [r["step"] for r in log] == [1, 2, 3, 4]     # steps 1-2 from the first call, 3-4 resumed


def test_a_changed_command_trains_anew_and_the_same_command_reuses(tmp_path, capsys):
    base = QUICK + ["--jobs", "1", "--out", str(tmp_path), "--only", "sft_mild", "--features", "lexical"]
    reproduce.main(base)
    ckpt, evaluation = (os.path.join(tmp_path, d, f) for d, f in (("ckpt", "sft_mild_s0.pt"), ("eval", "sft_mild_s0.json")))
    changed = base + ["--extra", "train_sft.py=--lr 3e-3"]
    reproduce.main(changed)       # the same --out, another learning rate: not the lr 1e-4 checkpoint reported again
    assert torch.load(ckpt, weights_only=True)["meta"]["args"]["lr"] == pytest.approx(3e-3)
    with open(evaluation) as f:   # and what reads the checkpoint ran again on the new one
        assert json.load(f)["checkpoint"]["sha256"] == stages.sha256(ckpt)
    mtimes = [os.path.getmtime(p) for p in (ckpt, evaluation)]
    capsys.readouterr()
    reproduce.main(changed)
    assert [os.path.getmtime(p) for p in (ckpt, evaluation)] == mtimes    # the same command: every stage reused
    printed = capsys.readouterr().out
    assert "reused train/sft_mild_s0" in printed and "reused evaluate/sft_mild_s0" in printed


def test_a_stage_is_keyed_on_its_flags_and_the_checkpoints_it_reads(tmp_path):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"one")
    key = stages.command("train_opd.py", ["--teacher", str(teacher), "--stop-after", "2"], [str(teacher)])
    assert key == stages.command("train_opd.py", ["--teacher", str(teacher)], [str(teacher)])   # where it stops: no
    assert key != stages.command("train_opd.py", ["--teacher", str(teacher), "--lr", "1e-3"], [str(teacher)])
    teacher.write_bytes(b"another")
    assert key != stages.command("train_opd.py", ["--teacher", str(teacher)], [str(teacher)])   # a retrained teacher


def test_two_processes_share_a_study_by_seeds_and_a_final_run_reports_both(tmp_path, monkeypatch):
    base = QUICK + ["--jobs", "1", "--out", str(tmp_path), "--only", "sft_mild", "--features", "lexical"]
    train, other = stages.train, {}

    def concurrently(args, stage, seed, costs):   # the second process (seed 1 only) runs while the first trains
        if seed == 0 and not other:
            other["started"] = True
            other.update(reproduce.main(base + ["--seeds", "2", "--first-seed", "1"]))
        return train(args, stage, seed, costs)

    monkeypatch.setattr(stages, "train", concurrently)
    first = reproduce.main(base)                                         # seed 0, and it writes its report last
    monkeypatch.undo()
    assert [r["seed"] for r in other["models"]["sft_mild"]["runs"]] == [1]
    assert {"train/sft_mild_s0", "train/sft_mild_s1"} <= set(first["costs"]["seconds"])   # both processes' costs
    ckpts = [stages.ckpt_path(argparse.Namespace(out=str(tmp_path)), "sft_mild", s) for s in (0, 1)]
    mtimes = [os.path.getmtime(c) for c in ckpts]
    final = reproduce.main(base + ["--seeds", "2"])
    assert [os.path.getmtime(c) for c in ckpts] == mtimes                 # nothing retrained
    assert final["models"]["sft_mild"]["gsm8k"]["n"] == 2 and final["costs"] == first["costs"]
    with pytest.raises(SystemExit):
        reproduce.main(base + ["--seeds", "2", "--first-seed", "2"])


def test_only_refuses_unknown_runs_and_students_without_their_teacher(tmp_path):
    base = QUICK + ["--out", str(tmp_path), "--only"]
    with pytest.raises(LoadError, match="no run named sft"):
        reproduce.main(base + ["sft"])
    with pytest.raises(LoadError, match="opd_stress learns from sft_stress"):
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
    assert stages._finished(path) is False
