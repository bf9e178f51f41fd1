"""Evaluation metrics (top-1, many/medium/few-shot buckets, per-group and worst-group) and backbones."""
import numpy as np
import torch

from engine.classify.metrics import EvalCounts, shot_buckets, summarize
from engine.classify.models import build_model
from engine.storage import Storage


def test_top1_shot_buckets_and_groups():
    counts = EvalCounts.zeros(num_classes=3, num_groups=2)
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 0, 1, 0, 0, 0])
    groups = np.array([0, 1, 0, 1, 0, -1])  # the last row has no group
    counts.add(preds, labels, groups)
    out = summarize(counts, group_ids=[10, 20], train_counts=np.array([150, 50, 5]), long_tail=True,
                    many_threshold=100, few_threshold=20)
    assert out["top1"] == 3 / 6
    assert out["acc_many"] == 1.0 and out["acc_medium"] == 0.5 and out["acc_few"] == 0.0
    assert out["acc_group_10"] == 2 / 3 and out["acc_group_20"] == 1 / 2
    assert out["worst_group_acc"] == 0.5
    # summable across workers: two halves all-reduced give the same numbers
    a, b = EvalCounts.zeros(3, 2), EvalCounts.zeros(3, 2)
    a.add(preds[:3], labels[:3], groups[:3])
    b.add(preds[3:], labels[3:], groups[3:])
    merged = EvalCounts.from_vector(a.as_vector() + b.as_vector(), 3, 2)
    assert summarize(merged, [10, 20]) == summarize(counts, [10, 20])
    assert set(summarize(counts, [])) == {"top1"}  # no groups, not long-tail: top-1 only


def test_shot_buckets_partition_classes():
    masks = shot_buckets(np.array([500, 100, 99, 20, 19, 1]), many_threshold=100, few_threshold=20)
    assert masks["many"].tolist() == [True, False, False, False, False, False]
    assert masks["few"].tolist() == [False, False, False, False, True, True]
    assert (masks["many"].astype(int) + masks["medium"] + masks["few"] == 1).all()


def test_backbones_build_offline_and_load_local_weights(tmp_path):
    x = torch.rand(2, 3, 32, 32)
    for name in ("small_cnn", "resnet18", "resnet50", "vit_b_16"):
        model = build_model(name, num_classes=7, resolution=32).eval()
        with torch.no_grad():
            assert model(x).shape == (2, 7)
    # ImageNet-style weights (1000-class head) from a local file: backbone loaded, head re-initialised
    source = build_model("resnet18", num_classes=1000, resolution=32)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", num_classes=7, resolution=32, pretrained=str(path), storage=Storage())
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 7
    # ViT weights made for 224 px load at 32 px (position embeddings interpolated)
    vit = build_model("vit_b_16", num_classes=1000, resolution=224)
    torch.save({"model": vit.state_dict()}, tmp_path / "vit.pth")
    small = build_model("vit_b_16", num_classes=7, resolution=32, pretrained=str(tmp_path / "vit.pth"))
    assert torch.equal(small.conv_proj.weight, vit.conv_proj.weight)
    assert small.encoder.pos_embedding.shape[1] == 1 + (32 // 16) ** 2
