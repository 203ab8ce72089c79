import torch

from rafmedia.engine.torchvision_compat import import_timm, import_torchvision, nms_reference


def brute_force_nms(boxes, scores, threshold):
    """Independent O(n^2) reference: keep a box unless a higher-scoring kept box overlaps it above threshold."""
    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union

    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept = []
    for i in order:
        if all(iou(boxes[i], boxes[k]) <= threshold for k in kept):
            kept.append(i)
    return kept


def test_nms_hand_computed_case():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # box 3 (0.95) suppresses its duplicate 0 (IoU 1) and 1 (IoU 81/119 = 0.68); box 2 is far away.
    assert nms_reference(boxes, scores, 0.5).tolist() == [3, 2]


def test_torchvision_nms_matches_brute_force_on_random_boxes():
    torchvision = import_torchvision()
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand((60, 2), generator=generator) * 50
    sizes = torch.rand((60, 2), generator=generator) * 20 + 1
    boxes = torch.cat([corners, corners + sizes], dim=1)
    scores = torch.rand(60, generator=generator)
    for threshold in (0.1, 0.3, 0.7):
        expected = brute_force_nms(boxes.tolist(), scores.tolist(), threshold)
        assert torchvision.ops.nms(boxes, scores, threshold).tolist() == expected


def test_timm_imports_and_runs_a_model():
    timm = import_timm()
    model = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 4) and torch.isfinite(out).all()


def test_batched_nms_keeps_boxes_of_different_classes_apart():
    torchvision = import_torchvision()
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10.0]])
    kept = torchvision.ops.batched_nms(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5)
    assert sorted(kept.tolist()) == [0, 1]
    assert torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]  # same class: one survives
