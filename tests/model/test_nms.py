import pytest
import torch
from torchvision.ops import box_iou, nms

from model.nms import grouped_nms, pairwise_iou


def clustered_boxes(generator: torch.Generator, groups: int, k: int) -> torch.Tensor:
    """Tensor[G, K, 4]: boxes jittered around a few centres, so suppression chains are long."""
    centres = torch.rand(groups, 3, 2, generator=generator) * 0.6 + 0.2
    pick = torch.randint(0, 3, (groups, k), generator=generator)
    centre = torch.gather(centres, 1, pick[..., None].expand(-1, -1, 2))
    centre = centre + torch.randn(groups, k, 2, generator=generator) * 0.03
    half = torch.rand(groups, k, 2, generator=generator) * 0.1 + 0.05
    return torch.cat([centre - half, centre + half], dim=-1)


def test_pairwise_iou_equals_torchvisions_box_iou():
    boxes = clustered_boxes(torch.Generator().manual_seed(0), 5, 30)
    expected = torch.stack([box_iou(b, b) for b in boxes])
    torch.testing.assert_close(pairwise_iou(boxes), expected)


@pytest.mark.parametrize("method", ["tensor", "torchvision"])
@pytest.mark.parametrize("threshold", [0.3, 0.45, 0.7])
def test_grouped_nms_keeps_exactly_what_torchvisions_nms_keeps_per_group(threshold, method):
    generator = torch.Generator().manual_seed(1)
    groups, k = 40, 60
    boxes = clustered_boxes(generator, groups, k)
    valid = torch.rand(groups, k, generator=generator) > 0.2
    keep = grouped_nms(boxes, valid, threshold, method=method)
    # Scores that decrease along each row, as the caller guarantees.
    scores = torch.linspace(1, 0.01, k)
    for g in range(groups):
        candidates = valid[g].nonzero().flatten()
        kept = candidates[nms(boxes[g, candidates], scores[candidates], threshold)]
        assert sorted(kept.tolist()) == keep[g].nonzero().flatten().tolist()


def test_grouped_nms_handles_empty_inputs_and_chunks(monkeypatch):
    for method in ("tensor", "torchvision"):
        assert grouped_nms(torch.zeros(0, 5, 4), torch.zeros(0, 5, dtype=torch.bool), 0.5, method).shape == (0, 5)
        assert grouped_nms(torch.zeros(3, 0, 4), torch.zeros(3, 0, dtype=torch.bool), 0.5, method).shape == (3, 0)
        none_valid = torch.zeros(2, 4, dtype=torch.bool)
        assert not grouped_nms(torch.rand(2, 4, 4), none_valid, 0.5, method).any()
    boxes = clustered_boxes(torch.Generator().manual_seed(2), 9, 20)
    valid = torch.ones(9, 20, dtype=torch.bool)
    whole = grouped_nms(boxes, valid, 0.5, method="tensor")
    monkeypatch.setattr("model.nms._MAX_PAIRS_PER_CHUNK", 2 * 20 * 20)  # two groups per chunk
    torch.testing.assert_close(grouped_nms(boxes, valid, 0.5, method="tensor"), whole)
