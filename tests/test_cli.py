import subprocess
import sys
from pathlib import Path

import torch

from deit_fast.cli import BENCHMARKS, main
from deit_fast.models import create_model
from tests.helpers import write_tiny_imagefolder

REPO = Path(__file__).resolve().parent.parent


def test_unknown_key_stops_before_any_work(capsys, tmp_path):
    code = main(["train", "--config", str(REPO / "configs" / "deit_tiny.yaml"), "optim.lrr=1",
                 f"train.output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_eval_refuses_missing_and_foreign_checkpoints(capsys, tmp_path):
    write_tiny_imagefolder(tmp_path / "data")
    common = ["model.name=deit_micro_patch4_32", f"data.path={tmp_path / 'data'}",
              "data.num_workers=0"]
    assert main(["eval", "--checkpoint", str(tmp_path / "nope.pt"), *common]) == 2
    assert "nope.pt' does not exist" in capsys.readouterr().err
    foreign = tmp_path / "tiny.pt"
    torch.save(create_model("deit_tiny_patch16_224", depth=1).state_dict(), foreign)
    assert main(["eval", "--checkpoint", str(foreign), *common]) == 2
    assert "checkpoint does not fit DeiT: tensor 'cls_token'" in capsys.readouterr().err


def test_eval_of_a_checkpoint_reports_accuracy(capsys, tmp_path):
    write_tiny_imagefolder(tmp_path / "data")
    path = tmp_path / "micro.pt"
    torch.save({"model": create_model("deit_micro_patch4_32", num_classes=3).state_dict()}, path)
    assert main(["eval", "--checkpoint", str(path), "model.name=deit_micro_patch4_32",
                 f"data.path={tmp_path / 'data'}", "data.num_workers=0"]) == 0
    assert '"top1"' in capsys.readouterr().out


def test_module_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "deit_fast", "--help"], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout
    for command in ("train", "eval", "demo", "bench"):
        assert command in out


def test_data_check_lists_bad_files(capsys, tmp_path):
    write_tiny_imagefolder(tmp_path / "data")
    assert main(["data", "check", "--data-path", str(tmp_path / "data")]) == 0
    (tmp_path / "data" / "train" / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert main(["data", "check", "--data-path", str(tmp_path / "data")]) == 1
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.out and "1 problem(s)" in captured.err


def test_bench_names_run_their_scripts_which_write_to_runs_bench(capfd):
    for name in ("kernels", "step", "data", "distill", "compile", "traffic"):
        assert main(["bench", name, "--help"]) == 0
        out = " ".join(capfd.readouterr().out.split())  # argparse wraps to the terminal
        assert "usage:" in out, name
        assert "default: runs/bench/" in out and "--out benchmarks/results" in out, name


def test_readme_lists_every_bench_name_with_its_script():
    readme = (REPO / "README.md").read_text()
    (line,) = [x for x in readme.splitlines() if x.startswith("deit-fast bench ")]
    assert line.split()[2].split("|") == list(BENCHMARKS)
    cells = [[c.strip(" `") for c in x.strip("|").split("|")] for x in readme.splitlines()
             if x.startswith("| `")]
    assert {c[0]: c[1] for c in cells if c[1].endswith(".py")} == BENCHMARKS  # its table


def test_ablation_writes_its_table_beside_its_runs_unless_given_one(monkeypatch, tmp_path):
    import deit_fast.ablation

    tables = []
    monkeypatch.setattr(deit_fast.ablation, "run_ablation",
                        lambda output_dir, overrides, table, select: tables.append(table) or {})
    assert main(["demo", "--ablation", "--output-dir", str(tmp_path)]) == 0
    assert main(["demo", "--ablation", "--select", "--output-dir", str(tmp_path)]) == 0
    assert main(["demo", "--ablation", "--table", str(tmp_path / "t.md")]) == 0
    assert [str(t) for t in tables] == [str(tmp_path / "distill_ablation.md"),
                                        str(tmp_path / "distill_selection.md"),
                                        str(tmp_path / "t.md")]
