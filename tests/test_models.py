import math
import os
import subprocess
import sys

import pytest
import timm
import torch

from deit_fast.models import (
    MODEL_SPECS,
    CheckpointMismatch,
    create_model,
    interpolate_pos_embed,
    load_checkpoint,
)
from deit_fast.ops import KernelChoice, KernelUnavailable, resolve_kernels


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_small_distilled_patch16_224"])
def test_timm_state_dict_gives_the_same_logits(name):
    torch.manual_seed(1)
    reference = timm.create_model(name, pretrained=False).eval()
    ours = create_model(name).eval()
    assert set(ours.state_dict()) == set(reference.state_dict())
    load_checkpoint(ours, {"model": reference.state_dict()})  # official layout: under "model"
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(images)
        for attention in ("sdpa", "eager"):
            ours.set_kernels(KernelChoice(attention=attention))
            torch.testing.assert_close(ours(images), expected, atol=1e-5, rtol=1e-5)


def test_distilled_model_returns_both_heads_in_training_and_their_mean_in_eval():
    model = create_model("deit_micro_distilled_patch4_32", num_classes=7)
    images = torch.randn(3, 3, 32, 32)
    cls_logits, dist_logits = model.train()(images)
    assert cls_logits.shape == dist_logits.shape == (3, 7)
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(images)
        expected = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
        torch.testing.assert_close(model(images), expected)


def test_registry_sizes_match_timm():
    for name in MODEL_SPECS:
        if "micro" in name:
            continue
        with torch.device("meta"):  # shapes only: no memory, no init cost
            ours = create_model(name).state_dict()
            theirs = timm.create_model(name, pretrained=False).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_init_is_truncated_normal():
    model = create_model("deit_tiny_patch16_224", depth=1)
    for tensor in (model.pos_embed, model.cls_token, model.blocks[0].attn.qkv.weight):
        assert tensor.abs().max() <= 0.04 + 1e-6  # cut at two standard deviations
        assert 0.01 < tensor.std() < 0.025
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)


def test_pos_embed_interpolation_matches_timm_and_keeps_prefix_tokens():
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 2 + 14 * 14, 32)
    ours = interpolate_pos_embed(pos, num_prefix_tokens=2, new_grid=24)
    theirs = resample_abs_pos_embed(pos, new_size=(24, 24), num_prefix_tokens=2,
                                    interpolation="bicubic", antialias=False)
    assert ours.shape == (1, 2 + 24 * 24, 32)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours[:, :2], pos[:, :2])
    assert interpolate_pos_embed(pos, 2, 14) is pos


def test_224_checkpoint_loads_into_384_model(tmp_path):
    small = create_model("deit_base_patch16_224", depth=1)
    path = tmp_path / "deit_base_224.pth"
    torch.save({"model": small.state_dict()}, path)
    big = create_model("deit_base_patch16_384", depth=1)
    load_checkpoint(big, path)
    assert big.pos_embed.shape == (1, 1 + 24 * 24, 768)
    torch.testing.assert_close(big.pos_embed[:, :1], small.pos_embed[:, :1])
    torch.testing.assert_close(big.blocks[0].mlp.fc1.weight, small.blocks[0].mlp.fc1.weight)


def test_checkpoint_of_another_model_is_refused_naming_the_tensor(tmp_path):
    tiny = create_model("deit_tiny_patch16_224", depth=2)
    small = create_model("deit_small_patch16_224", depth=2)
    with pytest.raises(CheckpointMismatch, match=r"'cls_token' has shape \(1, 1, 384\).*"
                                                 r"expects \(1, 1, 192\)"):
        load_checkpoint(tiny, small.state_dict())
    with pytest.raises(CheckpointMismatch, match=r"'blocks.1.norm1.weight'.*is missing"):
        load_checkpoint(tiny, create_model("deit_tiny_patch16_224", depth=1).state_dict())
    with pytest.raises(CheckpointMismatch, match=r"unexpected tensor 'blocks.2.attn.proj.bias'"):
        load_checkpoint(tiny, create_model("deit_tiny_patch16_224", depth=3).state_dict())
    with pytest.raises(FileNotFoundError, match="nope.pth.*does not exist"):
        load_checkpoint(tiny, tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatch, match="junk.pth.*cannot be read"):
        load_checkpoint(tiny, junk)


def test_new_head_keeps_fresh_head_for_other_class_counts():
    source = create_model("deit_micro_patch4_32", num_classes=10)
    target = create_model("deit_micro_patch4_32", num_classes=3)
    head = target.head.weight.clone()
    load_checkpoint(target, source.state_dict(), new_head=True)
    torch.testing.assert_close(target.head.weight, head)
    torch.testing.assert_close(target.pos_embed, source.pos_embed)


def test_drop_path_is_identity_in_eval_and_random_in_training():
    model = create_model("deit_micro_patch4_32", drop_path_rate=0.5)
    images = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images))
        model.train()
        assert not torch.allclose(model(images), model(images))


def _kept(out: torch.Tensor, x: torch.Tensor, rate: float) -> torch.Tensor:
    """Which samples drop path kept; each sample is either zeroed or scaled by 1 / keep."""
    kept = (out != 0).flatten(1).any(1)
    torch.testing.assert_close(out[kept], x[kept] / (1 - rate))
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    return kept


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.7])
def test_drop_path_keeps_one_minus_rate_and_rescales_as_timm(rate):
    """Our drop_path and timm's DropPath (scale_by_keep) both keep a sample with probability
    1 - rate and scale it by 1 / (1 - rate); 4.5 binomial standard deviations of slack."""
    from timm.layers import DropPath

    from deit_fast.models.deit import drop_path

    n = 20000
    x = torch.rand(n, 5, 3) + 0.5  # no exact zeros: a zero row means dropped
    tolerance = 4.5 * math.sqrt(rate * (1 - rate) / n)
    torch.manual_seed(0)
    ours = _kept(drop_path(x, rate, training=True), x, rate).float().mean().item()
    timm_drop = DropPath(rate, scale_by_keep=True).train()
    theirs = _kept(timm_drop(x), x, rate).float().mean().item()
    assert abs(ours - (1 - rate)) < tolerance and abs(theirs - (1 - rate)) < tolerance
    assert torch.equal(drop_path(x, rate, training=False), x)


def test_drop_path_rates_rise_linearly_with_depth_as_in_timm():
    """Block i drops each branch at timm's rate i / (depth - 1) * drop_path_rate, measured:
    the fraction of samples whose attention branch left the residual stream as it was, and
    whose MLP branch (the pending residual) comes out zero."""
    from timm.layers import calculate_drop_path_rates

    model = create_model("deit_micro_patch4_32", drop_path_rate=0.6).train()
    expected = calculate_drop_path_rates(0.6, len(model.blocks))
    assert expected[0] == 0 and expected[-1] == pytest.approx(0.6)
    n = 6000
    torch.manual_seed(0)
    x = torch.randn(n, 3, model.blocks[0].norm1.weight.shape[0])
    with torch.no_grad():
        for block, rate in zip(model.blocks, expected):
            stream, pending = block(x, None)
            tolerance = 4.5 * math.sqrt(rate * (1 - rate) / n) + 1e-9
            for dropped in ((stream == x).flatten(1).all(1), (pending == 0).flatten(1).all(1)):
                assert abs(dropped.float().mean().item() - rate) < tolerance, (block, rate)


def test_kernel_resolution():
    assert resolve_kernels(device="cpu") == KernelChoice("sdpa", "torch", "torch")
    with pytest.raises(KernelUnavailable, match="kernels.layernorm=apex cannot run: apex"):
        resolve_kernels(layernorm="apex", device="cpu")
    with pytest.raises(ValueError, match="kernels.gelu: 'fast' is not one of"):
        KernelChoice(gelu="fast")


def test_triton_without_gpu_or_interpreter_is_refused():
    code = ("from deit_fast.ops import resolve_kernels; "
            "resolve_kernels(attention='triton', device='cpu')")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "kernels.attention=triton cannot run: Triton kernels run on CPU tensors only under " \
           "the Triton interpreter" in result.stderr
