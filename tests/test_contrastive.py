"""Contrastive losses: InfoNCE and listwise CE through the fused engine, the pair-level circle loss.

InfoNCE is checked against ``F.cross_entropy`` on the materialised similarities (masked with -inf
where pairs are excluded); the circle loss against pytorch-metric-learning's ``CircleLoss``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_linear_cross_entropy import LargestTensor

import crossent as xe
from crossent.contrastive import info_nce, listwise_cross_entropy, pair_circle_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def embeddings(n=12, m=12, d=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    k = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    return q.requires_grad_(), k.requires_grad_()


def masked_logits(q, k, t, exclude=None):
    z = q @ k.T / t
    if exclude is not None:
        z = z.index_put((exclude[:, 0], exclude[:, 1]), torch.tensor(float("-inf"), dtype=z.dtype))
    return z


def assert_same(got, expected, leaves, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    g1 = torch.autograd.grad(got.sum(), leaves)
    g2 = torch.autograd.grad(expected.sum(), leaves)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_info_nce_is_cross_entropy_over_similarities(reduction):
    q, k = embeddings()
    n = q.shape[0]
    expected = F.cross_entropy(q @ k.T / 0.1, torch.arange(n), reduction=reduction)
    assert_same(info_nce(q, k, temperature=0.1, reduction=reduction, chunk_size=5), expected, (q, k))


def test_symmetric_is_the_mean_of_both_directions():
    q, k = embeddings()
    n = q.shape[0]
    expected = (F.cross_entropy(q @ k.T / 0.2, torch.arange(n)) + F.cross_entropy(k @ q.T / 0.2, torch.arange(n))) / 2
    assert_same(info_nce(q, k, temperature=0.2, symmetric=True, chunk_size=4), expected, (q, k))
    # A permuted pairing, per pair.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    inverse = torch.argsort(perm)
    both = (F.cross_entropy(q @ k.T / 0.2, perm, reduction="none")
            + F.cross_entropy(k @ q.T / 0.2, inverse, reduction="none")[perm]) / 2  # fmt: skip
    assert_same(info_nce(q, k, perm, temperature=0.2, symmetric=True, reduction="none"), both, (q, k))


def test_extra_negatives_and_explicit_positives():
    q, k = embeddings(n=7, m=30)
    positive = torch.tensor([3, 29, 0, 8, 8, 11, 2])
    expected = F.cross_entropy(q @ k.T / 0.05, positive)
    assert_same(info_nce(q, k, positive, temperature=0.05, chunk_size=3), expected, (q, k))
    assert_same(info_nce(q, k, temperature=0.05), F.cross_entropy(q @ k.T / 0.05, torch.arange(7)), (q, k))


def test_excluded_pairs_leave_the_softmax():
    q, k = embeddings()
    exclude = torch.tensor([[0, 3], [0, 5], [4, 1], [11, 0], [4, 9], [4, 2]])
    for symmetric in (False, True):
        got = info_nce(q, k, temperature=0.1, exclude=exclude, symmetric=symmetric, reduction="none", chunk_size=5)
        forward = F.cross_entropy(masked_logits(q, k, 0.1, exclude), torch.arange(12), reduction="none")
        if symmetric:
            backward = F.cross_entropy(masked_logits(k, q, 0.1, exclude.flip(-1)), torch.arange(12), reduction="none")
            forward = (forward + backward) / 2
        assert_same(got, forward, (q, k))
    # The exclusions change the pairs whose query or key has one, and only those.
    q, k = embeddings(dtype=torch.float64)
    got = info_nce(q, k, temperature=0.1, exclude=exclude, symmetric=True, reduction="none")
    changed = (got - info_nce(q, k, temperature=0.1, symmetric=True, reduction="none")).abs() > 1e-12
    assert changed.tolist() == [i in (0, 1, 2, 3, 4, 5, 9, 11) for i in range(12)]


def test_no_similarity_matrix_is_allocated():
    n, m, d, chunk = 40, 500, 8, 8
    q, k = embeddings(n=n, m=m, d=d)
    exclude = torch.tensor([[0, 7], [5, 100], [39, 499]])
    with LargestTensor(skip=[k.shape]) as rec:
        info_nce(q, k, temperature=0.1, exclude=exclude, chunk_size=chunk).backward()
    assert 0 < rec.largest <= chunk * m, rec.largest


def test_listwise_in_batch_and_per_query():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(5, 4, generator=g).requires_grad_()
    docs = torch.randn(5, 3, 4, generator=g).requires_grad_()
    target = torch.tensor([0, 2, 1, 0, 1])
    pooled = q @ docs.reshape(15, 4).T / 0.5
    expected = F.cross_entropy(pooled, torch.arange(5) * 3 + target)
    assert_same(listwise_cross_entropy(q, docs, target, temperature=0.5, chunk_size=2), expected, (q, docs))
    local = torch.einsum("nd,nld->nl", q, docs) / 0.5
    assert_same(listwise_cross_entropy(q, docs, target, temperature=0.5, in_batch=False), F.cross_entropy(local, target), (q, docs))
    exclude = torch.tensor([[1, 0], [3, 2]])
    local = torch.einsum("nd,nld->nl", q, docs) / 0.5
    masked = local.index_put((exclude[:, 0], exclude[:, 1]), torch.tensor(float("-inf")))
    got = listwise_cross_entropy(q, docs, target, temperature=0.5, in_batch=False, exclude=exclude)
    assert_same(got, F.cross_entropy(masked, target), (q, docs))


def test_contrastive_errors():
    q, k = embeddings(n=4, m=6)
    with pytest.raises(ValueError, match=r"excludes that query's positive"):
        info_nce(q, k, exclude=torch.tensor([[1, 2], [2, 2]]))
    with pytest.raises(ValueError, match="symmetric=True needs as many keys as queries"):
        info_nce(q, k, symmetric=True)
    with pytest.raises(ValueError, match="needs positive to be a permutation"):
        info_nce(q, k[:4], torch.tensor([0, 0, 1, 2]), symmetric=True)
    with pytest.raises(ValueError, match=r"positive\[1\] = 6 is outside \[0, 6\)"):
        info_nce(q, k, torch.tensor([0, 6, 1, 2]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        info_nce(q, k, temperature=0.0)
    with pytest.raises(ValueError, match=r"exclude\[0\] has key index 9"):
        info_nce(q, k, exclude=torch.tensor([[0, 9]]))
    with pytest.raises(ValueError, match="at least as many keys as queries"):
        info_nce(k, q)


def test_errors_name_the_users_arguments():
    """Found as: ``info_nce(q[:0], k[:0])`` said "c must have at least one class (row)", and float64
    candidates gave torch's internal dtype error."""
    q, k = embeddings(n=4, m=6)
    with pytest.raises(ValueError, match="key must have at least one row"):
        info_nce(q[:0], k[:0])
    with pytest.raises(TypeError, match="query and key must share one dtype, got torch.float32 and torch.float64"):
        info_nce(q, k.double())
    docs = torch.randn(4, 3, 6, dtype=torch.float64)
    for in_batch in (True, False):
        with pytest.raises(TypeError, match="query and candidates must share one dtype"):
            listwise_cross_entropy(q, docs, in_batch=in_batch)
    with pytest.raises(TypeError, match="candidates must be floating point"):
        listwise_cross_entropy(q, docs.long())
    with pytest.raises(TypeError, match="embeddings and ref_embeddings must share one dtype"):
        pair_circle_loss(q, torch.tensor([0, 0, 1, 1]), ref_embeddings=k.double(), ref_labels=torch.arange(6))


def test_no_queries_is_the_empty_loss_in_both_listwise_forms():
    q, _ = embeddings(n=4)
    docs = torch.randn(4, 3, 6)
    for in_batch in (True, False):
        for reduction, shape in (("sum", ()), ("none", (0,))):
            got = listwise_cross_entropy(q[:0], docs[:0], in_batch=in_batch, reduction=reduction)
            assert got.shape == shape and got.sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_fused_entry_points_return_linear_cross_entropys_dtype(dtype):
    """One rule (docs/linear.md): a float32 loss for half precision, float64 for float64; listwise's
    local form (``in_batch=False``, no fused product) follows it too."""
    q, k = embeddings(n=4, m=8, dtype=dtype)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert xe.linear_cross_entropy(q, k, torch.arange(4)).dtype == want
    assert info_nce(q, k).dtype == want
    assert info_nce(q, k[:4], symmetric=True, reduction="none").dtype == want
    docs = k.detach().reshape(4, 2, 6)
    for in_batch in (True, False):
        got = listwise_cross_entropy(q, docs, in_batch=in_batch)
        assert got.dtype == want, in_batch
        expected = listwise_cross_entropy(q.detach().double(), docs.double(), in_batch=in_batch)
        torch.testing.assert_close(got.double(), expected, rtol=3e-2 if dtype.itemsize == 2 else 1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "module,kw,error,text",
    [
        ("InfoNCELoss", dict(temperature=-1.0), ValueError, "temperature must be > 0"),
        ("InfoNCELoss", dict(symetric=True), TypeError, r"argument 'symetric'; did you mean 'symmetric'"),
        ("InfoNCELoss", dict(exclude=torch.tensor([[0, 1]])), TypeError, "unexpected keyword argument 'exclude'"),
        ("InfoNCELoss", dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
        ("InfoNCELoss", dict(reduction="avg"), ValueError, "reduction"),
        ("PairCircleLoss", dict(gamma=-1.0), ValueError, "gamma must be > 0"),
        ("PairCircleLoss", dict(m="0.4"), TypeError, "m must be a real number"),
        ("PairCircleLoss", dict(ref_labels=None), TypeError, "unexpected keyword argument 'ref_labels'"),
    ],
)
def test_module_forms_check_every_option_at_construction(module, kw, error, text):
    with pytest.raises(error, match=text):
        getattr(xe.nn, module)(**kw)


# -- pair-level circle loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,gamma", [(0.4, 80.0), (0.25, 256.0)])
def test_pair_circle_loss_equals_pytorch_metric_learning(m, gamma):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(24, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (24,), generator=g)
    labels[0] = 7  # an anchor without a positive
    mine = x.clone().requires_grad_()
    theirs = x.clone().requires_grad_()
    got = pair_circle_loss(mine, labels, m=m, gamma=gamma)
    expected = pml.CircleLoss(m=m, gamma=gamma)(theirs, labels)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    got.backward(), expected.backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-9, atol=1e-12)
    # With separate references (no anchor is its own pair there).
    ref, ref_labels = torch.randn(10, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (10,), generator=g)
    got = pair_circle_loss(x, labels, m=m, gamma=gamma, ref_embeddings=ref, ref_labels=ref_labels)
    expected = pml.CircleLoss(m=m, gamma=gamma)(x, labels, ref_emb=ref, ref_labels=ref_labels)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_pair_circle_loss_from_the_formula():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 3])
    got = pair_circle_loss(x, labels, m=0.3, gamma=10.0, reduction="none")
    s = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    for i in range(9):
        pos = [j for j in range(9) if j != i and labels[j] == labels[i]]
        neg = [j for j in range(9) if labels[j] != labels[i]]
        if not pos:
            assert got[i] == 0
            continue
        sp, sn = s[i, pos], s[i, neg]
        lp = -10.0 * (1.3 - sp).clamp_min(0) * (sp - 0.7)
        ln = 10.0 * (sn + 0.3).clamp_min(0) * (sn - 0.3)
        torch.testing.assert_close(got[i], F.softplus(torch.logsumexp(lp, 0) + torch.logsumexp(ln, 0)))
    crit = xe.nn.PairCircleLoss(m=0.3, gamma=10.0, reduction="sum")
    torch.testing.assert_close(crit(x, labels), got.sum())
