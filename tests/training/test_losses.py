"""Each loss pinned against values computed by hand (plain math, no torch) on a 2x3 score matrix."""
import math

import pytest
import torch

from training.losses import (bpr_loss, bpr_max_loss, check_loss_config, sampled_loss, softmax_neg,
                             top1_loss, top1_max_loss, xe_loss)

# rows = slots; column i is the target of row i; column 2 is an extra negative
R = torch.tensor([[1.0, 0.5, -0.2], [0.3, -0.4, 0.8]], dtype=torch.float64)
ROWS = [(1.0, [0.5, -0.2]), (-0.4, [0.3, 0.8])]  # (target score, negative scores)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_cross_entropy_by_hand():
    exp = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(0.5) + math.exp(-0.2))) \
          - math.log(math.exp(-0.4) / (math.exp(0.3) + math.exp(-0.4) + math.exp(0.8)))
    assert xe_loss(R).item() == pytest.approx(exp, rel=1e-12)
    assert exp == pytest.approx(0.64591 + 1.84591, abs=1e-4)  # 2.71828/(2.71828+1.64872+0.81873) etc.


def test_cross_entropy_logq_by_hand():
    # logQ subtracts logq * log(sampling prob) per column before the softmax
    q = [math.log(4.0), math.log(2.0), 0.5 * math.log(9.0)]
    a = [1.0 - q[0], 0.5 - q[1], -0.2 - q[2]]
    b = [0.3 - q[0], -0.4 - q[1], 0.8 - q[2]]
    exp = -math.log(math.exp(a[0]) / sum(map(math.exp, a))) - math.log(math.exp(b[1]) / sum(map(math.exp, b)))
    got = xe_loss(R, torch.tensor(q, dtype=torch.float64)).item()
    assert got == pytest.approx(exp, rel=1e-12)
    assert got != pytest.approx(xe_loss(R).item())


def test_top1_by_hand():
    exp = sum(sum(sig(rj - ri) + sig(rj * rj) for rj in neg) / len(neg) for ri, neg in ROWS)
    assert top1_loss(R).item() == pytest.approx(exp, rel=1e-12)


def test_bpr_by_hand():
    exp = sum(-sum(math.log(sig(ri - rj)) for rj in neg) / len(neg) for ri, neg in ROWS)
    assert bpr_loss(R).item() == pytest.approx(exp, rel=1e-12)


def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_top1_max_by_hand():
    exp = 0.0
    for ri, neg in ROWS:
        s = _softmax(neg)  # softmax over the negatives only
        exp += sum(sj * (sig(rj - ri) + sig(rj * rj)) for sj, rj in zip(s, neg))
    assert top1_max_loss(R).item() == pytest.approx(exp, rel=1e-12)


@pytest.mark.parametrize("bpreg", [0.0, 1.0, 1.95])
def test_bpr_max_by_hand(bpreg):
    exp = 0.0
    for ri, neg in ROWS:
        s = _softmax(neg)
        exp += -math.log(sum(sj * sig(ri - rj) for sj, rj in zip(s, neg)) + 1e-24)
        exp += bpreg * sum(sj * rj * rj for sj, rj in zip(s, neg))
    assert bpr_max_loss(R, bpreg).item() == pytest.approx(exp, rel=1e-12)


def test_bpr_max_positive_not_in_softmax_and_bpreg_matters():
    """Checklist 3: the positive gets zero softmax weight; bpreg changes the loss."""
    s = softmax_neg(R)
    assert s.diagonal().abs().max().item() == 0.0
    assert s.sum(1).tolist() == pytest.approx([1.0, 1.0])
    # moving the positive's score must not change the softmax weights of the negatives
    R2 = R.clone()
    R2[0, 0] = 7.0
    assert torch.allclose(softmax_neg(R2)[0], s[0])
    assert bpr_max_loss(R, 1.0).item() > bpr_max_loss(R, 0.0).item()


def test_final_activation_applied_once_before_loss():
    elu = torch.nn.functional.elu(R, alpha=0.5)
    assert sampled_loss(R, "bpr-max", "elu-0.5", bpreg=1.0).item() == pytest.approx(bpr_max_loss(elu, 1.0).item())
    # 'softmax' for cross-entropy = linear scores into ONE softmax (checklist 2: never twice)
    assert sampled_loss(R, "cross-entropy", "softmax").item() == pytest.approx(xe_loss(R).item())


def test_bad_loss_config_is_rejected():
    with pytest.raises(ValueError, match="softmax"):
        check_loss_config("bpr-max", "softmax")
    with pytest.raises(ValueError, match="unknown loss"):
        check_loss_config("top2", "linear")
    with pytest.raises(ValueError, match="cross-entropy"):
        check_loss_config("cross-entropy", "tanh")
