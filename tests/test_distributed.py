"""DDP through torchrun with gloo on the CPU: two ranks equal one process with their global batch,
evaluation counts every sample once, a stop signal on one rank stops both, and a checkpoint of
two ranks resumes on one."""

import json
import shutil

import pytest
from PIL import Image

from deit_fast import checkpoint
from deit_fast.run import train
from tests.helpers import (
    EXACT_DATA,
    assert_same_run,
    overrides,
    seeded_eval,
    tiny_config,
    torchrun,
    write_tiny_imagefolder,
)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Two ranks of batch 4; rank 1 alone gets SIGTERM as step 2 starts; the ranks agree on
    stopping every 2 steps, so both stop after step 2."""
    data = tmp_path_factory.mktemp("ddp") / "data"
    write_tiny_imagefolder(data)
    extra = data / "val" / "class_1" / "extra.jpg"  # 13 val images: not divisible by 2
    shutil.copy(data / "val" / "class_0" / "0.jpg", extra)
    Image.open(extra).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(extra)
    out = data.parent / "two"
    run = torchrun("--send", "SIGTERM", "--at", "1", "--rank", "1",
                   "--eval-first", str(data.parent / "eval.json"), "--",
                   *overrides(data, out, *EXACT_DATA, "data.batch_size=4", "train.max_steps=5",
                              "train.stop_check_interval=2"))
    return data, out, run


def test_sigterm_on_one_rank_stops_both_after_the_step(two_ranks):
    data, out, run = two_ranks
    assert run.returncode == 0, run.stderr[-3000:]
    assert "stopped on request at step 2" in run.stderr
    state = checkpoint.load(out / "checkpoints" / "last.pt")
    assert (state["global_step"], state["item_in_epoch"], state["world_size"]) == (2, 16, 2)
    assert len(state["rng"]) == 2  # every rank's RNG
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [1, 2]  # logged once: by rank 0 only


def test_distributed_eval_equals_single_process(two_ranks):
    data, _, run = two_ranks
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((data.parent / "eval.json").read_text())
    one = seeded_eval(data)
    assert two["top1"] == one["top1"] and two["top5"] == one["top5"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)


def test_two_ranks_match_one_and_resume_on_one_rank(two_ranks):
    data, out, run = two_ranks
    assert run.returncode == 0, run.stderr[-3000:]
    one = data.parent / "one"
    train(tiny_config(data, one, *EXACT_DATA, "data.batch_size=8", "train.max_steps=2"))
    # AdamW turns float-summation noise into ~2e-5 here; half the lr would move ~1e-3
    assert_same_run(one, out, atol=1e-4)
    # the 2-rank checkpoint continues on one rank with the same global batch
    for run_dir in (one, out):
        train(tiny_config(data, run_dir, *EXACT_DATA, "data.batch_size=8", "train.max_steps=5"))
    assert_same_run(one, out, atol=1e-4)


def test_ranks_agree_to_stop_at_an_update_end_in_an_odd_epoch(tmp_path):
    """Two ranks of batch 2, 7 steps an epoch in updates of 2: epoch 1's update ends (9, 11,
    13) are all odd. SIGTERM on rank 1 as step 8 starts; with train.stop_check_interval=4 the
    ranks agree at the first update end past step 8, step 9, not at the epoch's end (14)."""
    data = tmp_path / "data"
    write_tiny_imagefolder(data)  # 30 images, 2 repeats: 7 global batches of 4 an epoch
    out = tmp_path / "run"
    run = torchrun("--send", "SIGTERM", "--at", "8", "--rank", "1", "--",
                   *overrides(data, out, *EXACT_DATA, "data.batch_size=2", "train.epochs=3",
                              "train.accum_steps=2", "train.stop_check_interval=4"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "stopped on request at step 9" in run.stderr
    state = checkpoint.load(out / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 9)
