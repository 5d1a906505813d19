"""ITC: loss against a row-by-row hand computation, queue FIFO / wrap-around / size errors, temperature."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mplug_fast.objectives.itc import FeatureQueue, ITCLoss, clamp_temperature


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _hand_itc(img, txt, img_m, txt_m, keys_img, keys_txt, key_ids, ids, temp, alpha):
    """Per row, with explicit exp / log: targets alpha*softmax(momentum sims) + (1-alpha)*positives/#pos."""
    total = 0.0
    B = img.shape[0]
    for q, q_m, keys in ((img, img_m, keys_txt), (txt, txt_m, keys_img)):
        for i in range(B):
            sims = [float(q[i] @ k) / temp for k in keys]
            sims_m = [float(q_m[i] @ k) / temp for k in keys]
            lse = math.log(sum(math.exp(s) for s in sims))
            z_m = sum(math.exp(s) for s in sims_m)
            pos = [1.0 if key_ids[j] == ids[i] else 0.0 for j in range(len(keys))]
            n_pos = sum(pos)
            for j in range(len(keys)):
                target = alpha * math.exp(sims_m[j]) / z_m + (1 - alpha) * pos[j] / n_pos
                total -= target * (sims[j] - lse)
    return total / B / 2


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_matches_hand_computation_with_queue_and_ids(alpha):
    B, E, Q = 3, 4, 6
    img, txt = _unit(B, E, seed=1), _unit(B, E, seed=2)
    img_m, txt_m = _unit(B, E, seed=3), _unit(B, E, seed=4)
    ids = torch.tensor([7, 8, 7])
    itc = ITCLoss(E, queue_size=Q)
    # first step: only the batch is a key (the queue is empty)
    temp = torch.tensor(0.1)
    loss, extras = itc(img, txt, img_m, txt_m, temp, alpha, ids)
    want = _hand_itc(img, txt, img_m, txt_m, img_m, txt_m, ids.tolist(), ids.tolist(), 0.1, alpha)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert extras["positives"].tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    # second step: keys = new momentum batch + the 3 queued ones (3 of 6 slots filled, the rest masked)
    img2, txt2 = _unit(B, E, seed=5), _unit(B, E, seed=6)
    img2_m, txt2_m = _unit(B, E, seed=7), _unit(B, E, seed=8)
    ids2 = torch.tensor([8, 9, 10])
    loss2, _ = itc(img2, txt2, img2_m, txt2_m, temp, alpha, ids2)
    keys_img, keys_txt = torch.cat([img2_m, img_m]), torch.cat([txt2_m, txt_m])
    key_ids = ids2.tolist() + ids.tolist()
    want2 = _hand_itc(img2, txt2, img2_m, txt2_m, keys_img, keys_txt, key_ids, ids2.tolist(), 0.1, alpha)
    assert loss2.item() == pytest.approx(want2, rel=1e-5)


def test_itc_without_ids_has_only_the_pair_as_positive_and_gradients_reach_temp():
    B, E = 4, 8
    img, txt = _unit(B, E, seed=1).requires_grad_(), _unit(B, E, seed=2).requires_grad_()
    temp = torch.nn.Parameter(torch.tensor(0.07))
    loss, extras = ITCLoss(E, queue_size=0)(img, txt, img.detach(), txt.detach(), temp, 0.0)
    sims = img @ txt.t() / temp
    want = (F.cross_entropy(sims, torch.arange(B)) + F.cross_entropy(sims.t(), torch.arange(B))) / 2
    torch.testing.assert_close(loss, want)
    assert torch.equal(extras["positives"], torch.eye(B, dtype=torch.bool))
    loss.backward()
    assert temp.grad is not None and temp.grad.abs() > 0


def test_empty_queue_slots_are_masked_out():
    B, E = 2, 4
    args = (_unit(B, E, seed=1), _unit(B, E, seed=2), _unit(B, E, seed=3), _unit(B, E, seed=4))
    with_queue, _ = ITCLoss(E, queue_size=8)(*args, torch.tensor(0.1), 0.4)
    without, _ = ITCLoss(E, queue_size=0)(*args, torch.tensor(0.1), 0.4)
    torch.testing.assert_close(with_queue, without)


def test_queue_wraps_around_fifo():
    q = FeatureQueue(6, 2)
    batches = [torch.full((2, 2), float(k)) for k in range(5)]
    for k, b in enumerate(batches):
        q.enqueue(b, -b, torch.tensor([10 * k, 10 * k + 1]))
    # 5 batches of 2 into 6 slots: slots 0-1 hold batch 3, 2-3 batch 4, 4-5 batch 2
    assert q.image[:, 0].tolist() == [3, 3, 4, 4, 2, 2]
    assert q.text[:, 0].tolist() == [-3, -3, -4, -4, -2, -2]
    assert q.ids.tolist() == [30, 31, 40, 41, 20, 21]
    assert int(q.ptr) == 4 and int(q.filled) == 6
    assert q.valid().all()


def test_queue_partially_filled_and_state_dict():
    q = FeatureQueue(8, 3)
    q.enqueue(torch.ones(4, 3), torch.ones(4, 3), torch.arange(4))
    assert q.valid().tolist() == [True] * 4 + [False] * 4
    assert {"image", "text", "ids", "ptr", "filled"} <= set(q.state_dict())
    q2 = FeatureQueue(8, 3)
    q2.load_state_dict(q.state_dict())
    assert int(q2.ptr) == 4 and torch.equal(q2.image, q.image)


def test_queue_size_not_multiple_of_global_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="queue_size 10 is not a multiple of the global batch 4"):
        FeatureQueue(10, 4, global_batch=4)
    itc = ITCLoss(4, queue_size=10)
    args = [_unit(4, 4, seed=s) for s in range(4)]
    with pytest.raises(ValueError, match="not a multiple of the global batch 4"):
        itc(*args, torch.tensor(0.1), 0.4)
    with pytest.raises(ValueError, match="not a multiple"):
        FeatureQueue(6, 2).enqueue(torch.ones(4, 2), torch.ones(4, 2), torch.arange(4))


def test_temperature_clamp():
    t = torch.nn.Parameter(torch.tensor(1e-5))
    clamp_temperature(t)
    assert t.item() == pytest.approx(0.001)
    t = torch.nn.Parameter(torch.tensor(0.9))
    clamp_temperature(t)
    assert t.item() == pytest.approx(0.5)
    t = torch.nn.Parameter(torch.tensor(0.07))
    clamp_temperature(t)
    assert t.item() == pytest.approx(0.07)
    assert t.requires_grad
