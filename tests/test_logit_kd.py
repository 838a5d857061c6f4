"""Logit distillation losses against hand computations (ClinKD's (alpha*KD + CE)/(1 + alpha))."""

import math

import pytest
import torch

from medvl.errors import MedvlUserError
from medvl.losses.logit_kd import (
    LogitKDLoss,
    TopK,
    answer_rows,
    divergence,
    sequence_kd_loss,
    topk_of,
)


def softmax(xs, T=1.0):
    e = [math.exp(x / T) for x in xs]
    return [v / sum(e) for v in e]


S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TT = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]


def test_forward_reverse_jsd_equal_hand_computation():
    s, t = torch.tensor(S), torch.tensor(TT)
    for T in (1.0, 0.5):
        fwd = rev = jsd = 0.0
        for srow, trow in zip(S, TT):
            ps, pt = softmax(srow, T), softmax(trow, T)
            fwd += sum(a * math.log(a / b) for a, b in zip(pt, ps)) / 2
            rev += sum(b * math.log(b / a) for a, b in zip(pt, ps)) / 2
            m = [0.3 * a + 0.7 * b for a, b in zip(pt, ps)]
            jsd += (0.3 * sum(a * math.log(a / c) for a, c in zip(pt, m))
                    + 0.7 * sum(b * math.log(b / c) for b, c in zip(ps, m))) / 2
        for kind, ref in (("forward", fwd), ("reverse", rev), ("jsd", jsd)):
            got = LogitKDLoss(kind=kind, temperature=T, beta=0.3).kd(s, t)
            assert abs(float(got) - ref) < 1e-6, (kind, T)
        scaled = LogitKDLoss(temperature=T, t2_scale=True).kd(s, t)
        assert abs(float(scaled) - fwd * T * T) < 1e-6


def test_combined_loss_is_weighted_mean_of_kd_and_ce():
    s, t, y = torch.tensor(S), torch.tensor(TT), torch.tensor([1, 2])
    out = LogitKDLoss(alpha=0.5, temperature=0.5)(s, t, y)
    ce = -(math.log(softmax(S[0])[1]) + math.log(softmax(S[1])[2])) / 2
    assert abs(float(out["ce"]) - ce) < 1e-6
    assert abs(float(out["loss"]) - (0.5 * float(out["kd"]) + ce) / 1.5) < 1e-6


def test_zero_when_student_equals_teacher_every_kind_and_topk():
    x = torch.randn(5, 11)
    for kind in ("forward", "reverse", "jsd"):
        assert float(LogitKDLoss(kind=kind, temperature=0.7).kd(x, x.clone())) == pytest.approx(0.0, abs=1e-6)
        assert float(LogitKDLoss(kind=kind).kd(x, topk_of(x, 4))) == pytest.approx(0.0, abs=1e-3)  # fp16 values
    assert float(divergence(x.log_softmax(-1), x.log_softmax(-1))[0]) == pytest.approx(0.0, abs=1e-6)


def test_prompt_and_padding_positions_never_contribute_and_the_mask_is_shifted():
    torch.manual_seed(0)
    B, T, V = 2, 7, 13
    labels = torch.full((B, T), -100)
    labels[0, 4:6] = torch.tensor([3, 4])  # answer tokens at positions 4, 5 -> predicted by logits 3, 4
    labels[1, 2] = 7
    s, t = torch.randn(B, T, V), torch.randn(B, T, V)
    base = sequence_kd_loss(s, t, labels, alpha=0.5)
    s2, t2 = s.clone(), t.clone()
    keep = torch.zeros(B, T, dtype=torch.bool)
    keep[0, 3:5] = True
    keep[1, 1] = True
    s2[~keep] = torch.randn(int((~keep).sum()), V) * 10  # change every prompt / pad / last position
    t2[~keep] = torch.randn(int((~keep).sum()), V) * 10
    other = sequence_kd_loss(s2, t2, labels, alpha=0.5)
    assert torch.allclose(base["loss"], other["loss"]) and torch.allclose(base["kd"], other["kd"])
    rows, y = answer_rows(s, labels)
    assert rows.shape == (3, V) and y.tolist() == [3, 4, 7] and torch.equal(rows[0], s[0, 3])
    # position 5 holds an answer label but its logits predict position 6: the unshifted mask of ClinKD's
    # published trainer would score it; the shifted mask does not
    s3 = s.clone()
    s3[0, 5] += 10 * torch.randn(V)
    assert torch.allclose(sequence_kd_loss(s3, t, labels)["loss"], base["loss"])


def test_no_gradient_reaches_the_teacher():
    s = torch.randn(3, 9, requires_grad=True)
    t = torch.randn(3, 9, requires_grad=True)
    LogitKDLoss(alpha=1.0)(s, t, torch.tensor([0, 1, 2]))["loss"].backward()
    assert s.grad is not None and t.grad is None
    tk = topk_of(t.detach(), 3)
    tk.values.requires_grad_(True)
    LogitKDLoss()(s, tk, torch.tensor([0, 1, 2]))["loss"].backward()
    assert tk.values.grad is None


def test_vocabulary_sizes_handled_explicitly():
    s, t = torch.randn(2, 10), torch.randn(2, 12)
    with pytest.raises(MedvlUserError, match="vocab: common"):
        LogitKDLoss().kd(s, t)
    got = LogitKDLoss(vocab="common").kd(s, t)
    assert torch.allclose(got, LogitKDLoss().kd(s, t[:, :10]))
    with pytest.raises(MedvlUserError, match="vocab: common"):
        LogitKDLoss().kd(s, TopK(torch.randn(2, 2), torch.tensor([[0, 11], [1, 2]])))
    with pytest.raises(MedvlUserError, match="number of answer tokens"):
        LogitKDLoss()(s, t[:1, :10], torch.tensor([0, 1]))
    with pytest.raises(MedvlUserError, match="unknown KD divergence"):
        LogitKDLoss(kind="kl")


def test_topk_restricted_kl_approaches_full_kl_as_k_grows():
    torch.manual_seed(1)
    s, t = torch.randn(64, 50), torch.randn(64, 50) * 3
    full = float(LogitKDLoss().kd(s, t))
    errs = [abs(float(LogitKDLoss().kd(s, topk_of(t, k))) - full) for k in (5, 20, 50)]
    assert errs[2] < 1e-3 and errs[0] > errs[2]


def test_cached_teacher_padding_ids_are_left_out_as_the_live_teacher_does():
    """vocab: common — a live teacher's columns past the student's vocabulary are cut; a cached top-k
    teacher's ids there were refused. Now both give the same loss."""
    torch.manual_seed(0)
    s, t = torch.randn(3, 10), torch.randn(3, 12)
    t[:, 10:] += 5.0  # padding rows rank in the teacher's top-k
    k = 6
    cached = topk_of(t, k)
    assert bool((cached.indices >= 10).any())
    kd = LogitKDLoss(vocab="common")
    got = kd.kd(s, cached)
    # reference: the top-k support without the padding ids, renormalised on both sides
    ref = []
    for r in range(3):
        keep = [int(i) for i in cached.indices[r] if int(i) < 10]
        tl = torch.log_softmax(cached.values[r].float()[[j for j, i in enumerate(cached.indices[r]) if int(i) < 10]], -1)
        sl = torch.log_softmax(s[r, keep], -1)
        ref.append((tl.exp() * (tl - sl)).sum())
    assert torch.allclose(got, torch.stack(ref).mean(), atol=1e-5)
