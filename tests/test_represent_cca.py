"""represent family, CCA / CKA / CHES: cca vs scikit-learn's CCA and the DCCA-style reference, cca_loss
gradients (gradcheck, repeated eigenvalues where autograd through eigh is NaN), linear / debiased CKA vs
numpy written here from Kornblith et al.'s formulas, ches_score vs a per-pair loop, compile, bad input."""

import numpy as np
import pytest
import torch
from sklearn.cross_decomposition import CCA

import alignops
from alignops.reference import represent as ref


def views(n, d1, d2, *batch, shared=2, dtype=torch.float64):
    """Two views with `shared` correlated latent directions plus noise."""
    z = torch.randn(*batch, n, shared, dtype=torch.float64)
    H1 = z @ torch.randn(shared, d1, dtype=torch.float64) + 0.7 * torch.randn(*batch, n, d1, dtype=torch.float64)
    H2 = z @ torch.randn(shared, d2, dtype=torch.float64) + 0.9 * torch.randn(*batch, n, d2, dtype=torch.float64)
    return H1.to(dtype), H2.to(dtype)


def whitened(n, d):
    """n x d features whose sample covariance is exactly the identity: d repeated eigenvalues."""
    X = torch.randn(n, d, dtype=torch.float64)
    Q, _ = torch.linalg.qr(X - X.mean(0))
    return Q * (n - 1) ** 0.5


# ---- cca ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d1,d2,k", [(6, 4, 3), (3, 5, 2), (5, 5, 1)])
def test_cca_matches_sklearn(d1, d2, k):
    H1, H2 = views(400, d1, d2, shared=3)
    model = CCA(n_components=k, scale=False, max_iter=20000, tol=1e-14).fit(H1.numpy(), H2.numpy())
    U, V = model.transform(H1.numpy(), H2.numpy())
    expected = [np.corrcoef(U[:, i], V[:, i])[0, 1] for i in range(k)]
    got = alignops.cca(H1, H2, k=k, reg=0.0)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cca_batched_matches_reference(dtype):
    H1, H2 = views(37, 5, 7, 3, 2, dtype=dtype)
    got = alignops.cca(H1, H2, reg=1e-3)
    assert got.shape == (3, 2, 5) and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    exp = torch.stack([torch.stack([ref.cca(H1[i, j], H2[i, j], reg=1e-3) for j in range(2)]) for i in range(3)])
    # fp64 accumulation: the only error of low-precision inputs is their own rounding, and the output's
    tol = 1e-10 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), exp, rtol=tol, atol=tol)
    assert (got[..., :-1] >= got[..., 1:]).all() and (got <= 1).all() and (got >= 0).all()
    torch.testing.assert_close(alignops.cca_loss(H1, H2, k=2), -got[..., :2].sum(-1))


def test_cca_broadcast_and_identical_views():
    H1, H2 = views(30, 4, 3, 5)
    got = alignops.cca(H1, H2[0], k=2)
    torch.testing.assert_close(got[2], alignops.cca(H1[2], H2[0], k=2))
    # identical views: every correlation is lambda / (lambda + reg) -> 1 as reg -> 0
    corr = alignops.cca(H1, H1, reg=1e-10)
    torch.testing.assert_close(corr, torch.ones_like(corr), rtol=0, atol=1e-8)


def test_cca_loss_gradcheck():
    H1, H2 = views(12, 3, 4, 2)
    assert torch.autograd.gradcheck(
        lambda a, b: alignops.cca_loss(a, b, k=2, reg=1e-2), (H1.requires_grad_(), H2.requires_grad_())
    )


def test_cca_loss_gradients_at_repeated_eigenvalues():
    n = 20
    H2 = views(n, 3, 3)[1]
    # Sigma11 = 2/19 I exactly (+/-1 pairs): autograd through eigh divides by w_i - w_j = 0 -> NaN gradients
    exact = torch.zeros(n, 4, dtype=torch.float64)
    for i in range(4):
        exact[2 * i, i], exact[2 * i + 1, i] = 1.0, -1.0
    a = exact.clone().requires_grad_()
    (-ref.cca(a, H2, reg=1e-3).sum()).backward()
    assert torch.isnan(a.grad).all()
    # whitened features (Sigma11 = I up to rounding) and a relative gap of 1e-9: finite, and what finite
    # differences measure
    H1 = whitened(n, 4)
    near = H1 * torch.tensor([1.0, 1 + 1e-9, 1 - 1e-9, 1.0], dtype=torch.float64)
    for X in (exact, H1, near):
        x, y = X.clone().requires_grad_(), H2.clone().requires_grad_()
        alignops.cca_loss(x, y, reg=1e-3).backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
        assert torch.autograd.gradcheck(
            lambda p, q: alignops.cca_loss(p, q, reg=1e-3), (X.clone().requires_grad_(), H2.clone().requires_grad_())
        )


def test_cca_loss_gradient_with_all_correlations_equal():
    # two views that are the same up to a rotation: all canonical correlations equal (a repeated singular value)
    H1 = views(25, 3, 3)[0]
    R, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    a = H1.clone().requires_grad_()
    loss = alignops.cca_loss(a, H1 @ R, reg=1e-2)
    loss.backward()
    assert torch.isfinite(a.grad).all()
    assert torch.autograd.gradcheck(lambda x: alignops.cca_loss(x, H1 @ R, reg=1e-2), (H1.clone().requires_grad_(),))


def test_cca_compile_fullgraph():
    H1, H2 = views(16, 3, 4, 2)
    fn = torch.compile(lambda a, b: alignops.cca_loss(a, b, k=2), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(H1, H2), alignops.cca_loss(H1, H2, k=2))


def test_cca_bad_input():
    H1, H2 = torch.randn(10, 3), torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"k must be in \[1, min\(d1, d2\) = 3\]"):
        alignops.cca(H1, H2, k=4)
    with pytest.raises(ValueError, match="same number of samples"):
        alignops.cca(H1, torch.randn(9, 4))
    with pytest.raises(ValueError, match="reg must be >= 0"):
        alignops.cca(H1, H2, reg=-1.0)
    with pytest.raises(ValueError, match="need n >= 2 samples"):
        alignops.cca(H1[:1], H2[:1])
    with pytest.raises(ValueError, match=r"H1 must have shape \[..., n, d\]"):
        alignops.cca(torch.randn(10), H2)
    with pytest.raises(ValueError, match="H2 must be float32"):
        alignops.cca(H1, torch.ones(10, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="must broadcast"):
        alignops.cca(torch.randn(2, 10, 3), torch.randn(3, 10, 4))


# ---- linear CKA ------------------------------------------------------------------------------------------


def np_center_gram(gram, unbiased):
    """Kornblith et al.'s colab (google-research/representation_similarity), written out in numpy."""
    gram = gram.copy()
    n = gram.shape[0]
    if unbiased:
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = np.mean(gram, 0)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def np_cka(x, y, debiased):
    gx, gy = np_center_gram(x @ x.T, debiased), np_center_gram(y @ y.T, debiased)
    return gx.ravel() @ gy.ravel() / (np.linalg.norm(gx) * np.linalg.norm(gy))


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n,d1,d2", [(50, 7, 3), (6, 40, 33), (9, 1, 2)])
def test_linear_cka_matches_numpy(debiased, n, d1, d2):
    X, Y = views(n, d1, d2, 4, shared=1)
    got = alignops.linear_cka(X, Y, debiased=debiased)
    exp = [np_cka(X[i].numpy(), Y[i].numpy(), debiased) for i in range(4)]
    torch.testing.assert_close(got, torch.tensor(exp, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        got, torch.stack([ref.linear_cka(X[i], Y[i], debiased) for i in range(4)]), rtol=1e-10, atol=1e-12
    )


def test_debiased_normaliser_is_debiased():
    # The biased-normaliser mistake of a popular torch port changes the value: make sure it is not ours.
    X, Y = views(12, 5, 4)
    ours = alignops.linear_cka(X, Y, debiased=True)
    gx, gy = np_center_gram(X.numpy() @ X.numpy().T, True), np_center_gram(Y.numpy() @ Y.numpy().T, True)
    bx, by = np_center_gram(X.numpy() @ X.numpy().T, False), np_center_gram(Y.numpy() @ Y.numpy().T, False)
    wrong = gx.ravel() @ gy.ravel() / (np.linalg.norm(bx) * np.linalg.norm(by))
    assert abs(ours.item() - wrong) > 1e-3


def test_linear_cka_invariances_and_dtypes():
    X, Y = views(40, 6, 5)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    for debiased in (False, True):
        base = alignops.linear_cka(X, Y, debiased=debiased)
        torch.testing.assert_close(alignops.linear_cka(3.0 * X @ Q + 1.0, Y, debiased=debiased), base)
        torch.testing.assert_close(alignops.linear_cka(X, X, debiased=debiased), torch.tensor(1.0, dtype=torch.float64))
    f32 = alignops.linear_cka(X.float(), Y.float())
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), alignops.linear_cka(X, Y), rtol=1e-5, atol=1e-6)
    assert torch.isnan(alignops.linear_cka(torch.ones(5, 3), torch.randn(5, 2)))  # constant representation


def test_linear_cka_gradcheck_and_compile():
    X, Y = views(8, 3, 2, 2)
    for debiased in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, debiased=debiased: alignops.linear_cka(a, b, debiased=debiased),
            (X.clone().requires_grad_(), Y.clone().requires_grad_()),
        )
    fn = torch.compile(lambda a, b: alignops.linear_cka(a, b, debiased=True), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(X, Y), alignops.linear_cka(X, Y, debiased=True))


def test_linear_cka_bad_input():
    with pytest.raises(ValueError, match="need n >= 4 samples"):
        alignops.linear_cka(torch.randn(3, 2), torch.randn(3, 2), debiased=True)
    with pytest.raises(ValueError, match="same number of samples"):
        alignops.linear_cka(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="Y must be on the device of X"):
        alignops.linear_cka(torch.randn(5, 2), torch.randn(5, 2, device="meta"))


# ---- CHES --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length_normalized", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ches_matches_per_pair_loop(length_normalized, dtype):
    B, H = 5, 33
    hp, hm = torch.randn(B, 11, H, dtype=dtype), torch.randn(B, 7, H, dtype=dtype)
    mp, mm = torch.rand(B, 11) > 0.4, torch.rand(B, 7) > 0.3
    mp[:, 0] = True
    mm[:, 0] = True
    got = alignops.ches_score(hp, hm, mp, mm, length_normalized=length_normalized)
    exp = ref.ches_score(hp, hm, mp, mm, length_normalized)
    assert got.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got.double(), exp, rtol=tol, atol=tol)


def test_ches_by_hand_and_defaults():
    hp = torch.tensor([[[1.0, 0.0], [1.0, 2.0]]])  # h+ = (2, 2)
    hm = torch.tensor([[[3.0, 1.0], [5.0, 5.0], [0.0, 0.0]]])  # h- (two tokens) = (3, 1)
    mm = torch.tensor([[True, False, True]])
    assert alignops.ches_score(hp, hm, None, mm).item() == 2 * 3 + 2 * 1 - 8
    # normalised: h+/2 = (1, 1), h-/2 = (1.5, 0.5): 2 - 2
    assert alignops.ches_score(hp, hm, None, mm, length_normalized=True).item() == 0.0
    hp.requires_grad_()
    alignops.ches_score(hp, hm, None, mm).sum().backward()
    torch.testing.assert_close(hp.grad, torch.tensor([[[3.0 - 4, 1.0 - 4]] * 2]))


def test_ches_bad_input():
    with pytest.raises(ValueError, match=r"h_chosen must be a float tensor of shape \[B, T, H\]"):
        alignops.ches_score(torch.randn(2, 3), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="h_rejected must have the batch size and hidden size"):
        alignops.ches_score(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"chosen_mask must be a bool tensor of shape \[2, 3\]"):
        alignops.ches_score(torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.ones(2, 3))


def test_empty_batches():
    assert alignops.cca(torch.randn(0, 10, 3), torch.randn(0, 10, 4)).shape == (0, 3)
    assert alignops.cca_loss(torch.randn(0, 10, 3), torch.randn(0, 10, 4)).shape == (0,)
    assert alignops.linear_cka(torch.randn(0, 10, 3), torch.randn(0, 10, 4), debiased=True).shape == (0,)
    assert alignops.ches_score(torch.randn(0, 10, 3), torch.randn(0, 7, 3)).shape == (0,)
