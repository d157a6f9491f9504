"""Sample-quality metrics for the study, each reported with its real-vs-real floor.

digits (in a fixed feature space: a 32-d PCA fitted on the real digits)
  frechet     Fréchet distance between Gaussian fits of real and generated features
  precision   share of generated samples inside the real k-NN manifold (quality)
  recall      share of real samples inside the generated k-NN manifold (coverage;
              the mode-collapse signal)            [Kynkäänniemi et al. 2019, k = 3]
  diversity   mean within-class pairwise feature distance of the generated set
  accuracy    a classifier fitted on real digits agrees with the prompted class; the study's
              logistic one is a sanity check (it rates blurry class means ~0.99); ``classifier="svc"``
              (the digits benchmark, evals/digits) is fitted on 80 % and reports its held-out accuracy
mixture2d
  sliced_w2     sliced Wasserstein-2 to fresh real samples (256 random directions)
  mode_coverage share of modes that receive ≥ 25 % of their expected mass
  mode_balance  1 − total variation between the generated mode shares and the true weights
  off_mode      share of samples farther than 3σ from every centre
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg

from twinflow.study.datasets import Digits, Mixture2D


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------


@dataclass
class DigitsJudge:
    """Feature space, classifier and real statistics, fitted once on the real digits."""

    pca: object
    classifier: object
    real_feats: np.ndarray
    real_labels: np.ndarray
    heldout_accuracy: float | None = None
    """Accuracy on the 20 % of real digits the classifier did not see (classifier="svc")."""

    @staticmethod
    def fit(data: Digits, dims: int = 32, seed: int = 0, classifier: str = "logistic") -> "DigitsJudge":
        """``classifier``: "logistic" (fitted on every digit; the study's sanity check) or "svc" (an RBF
        SVM with probabilities, fitted on a stratified 80 % split, its held-out accuracy recorded)."""
        from sklearn.decomposition import PCA

        x = data.images.numpy().astype(np.float64)
        y = data.labels.numpy()
        pca = PCA(n_components=dims, random_state=seed).fit(x)
        heldout = None
        if classifier == "logistic":
            from sklearn.linear_model import LogisticRegression

            clf = LogisticRegression(max_iter=2000).fit(x, y)
        elif classifier == "svc":
            from sklearn.calibration import CalibratedClassifierCV
            from sklearn.model_selection import train_test_split
            from sklearn.svm import SVC

            xa, xb, ya, yb = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
            # x in [−1, 1] is the [0, 16] scan ÷ 8 − 1, so gamma 0.001 on the raw scale is 0.064 here.
            # Probabilities from sigmoid calibration on cross-validated scores, one SVM fitted on the split.
            clf = CalibratedClassifierCV(SVC(C=10.0, gamma=0.064), method="sigmoid", ensemble=False, cv=5)
            clf.fit(xa, ya)
            heldout = float((clf.predict(xb) == yb).mean())
        else:
            raise ValueError(f"unknown digits classifier {classifier!r}; use logistic or svc")
        return DigitsJudge(pca, clf, pca.transform(x), y, heldout)

    def classify(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted class, its probability) per row of [N, 64] digits in [−1, 1]."""
        probs = self.classifier.predict_proba(np.clip(np.asarray(x, dtype=np.float64), -1, 1))
        classes = np.asarray(self.classifier.classes_)
        best = probs.argmax(axis=1)
        return classes[best], probs[np.arange(len(best)), best]

    def features(self, x: np.ndarray) -> np.ndarray:
        return self.pca.transform(np.asarray(x, dtype=np.float64))

    def score(self, generated: np.ndarray, labels: np.ndarray, k: int = 3) -> dict[str, float]:
        feats = self.features(np.clip(generated, -1, 1))
        return {
            "frechet": frechet_distance(self.real_feats, feats),
            "precision": knn_precision(self.real_feats, feats, k),
            "recall": knn_precision(feats, self.real_feats, k),
            "diversity": within_class_distance(feats, labels),
            "accuracy": float((self.classifier.predict(np.clip(generated, -1, 1)) == labels).mean()),
        }

    def real_floor(self, seed: int = 0, k: int = 3) -> dict[str, float]:
        """The same metrics between two random halves of the real digits."""
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(self.real_labels))
        a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
        fa, fb = self.real_feats[a], self.real_feats[b]
        return {"frechet": frechet_distance(fa, fb), "precision": knn_precision(fa, fb, k),
                "recall": knn_precision(fb, fa, k),
                "diversity": within_class_distance(self.real_feats, self.real_labels)}


def digits_quality(judge: DigitsJudge, digits: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None,
                   threshold: float = 0.5, k: int = 3) -> dict[str, float | None]:
    """Generated digits ([N, 64] in [−1, 1], prompted ``labels``) against the real ones: accuracy (the
    classifier's class is the prompted one with probability ≥ ``threshold``; mean over classes), its
    per-class values, and in the judge's feature space Fréchet distance, k-NN precision / recall and
    the within-group (within-prompt; default: within-class) diversity, also as a ratio to the real
    digits' within-class diversity. The digits benchmark (evals/digits) and the training probe use it."""
    digits = np.clip(np.asarray(digits, dtype=np.float64), -1, 1)
    labels = np.asarray(labels)
    groups = labels if groups is None else np.asarray(groups)
    pred, conf = judge.classify(digits)
    correct = (pred == labels) & (conf >= threshold)
    per_class = {int(c): float(correct[labels == c].mean()) for c in np.unique(labels)}
    feats = judge.features(digits)
    real_div = within_class_distance(judge.real_feats, judge.real_labels)
    sized = len(feats) > max(k, 2)
    diversity = within_class_distance(feats, groups) if len(feats) > len(np.unique(groups)) else None
    return {"accuracy": float(np.mean(list(per_class.values()))), "per_class": per_class,
            "frechet": frechet_distance(judge.real_feats, feats) if sized else None,
            "precision": knn_precision(judge.real_feats, feats, k),
            "recall": knn_precision(feats, judge.real_feats, k) if sized else None,
            "diversity": diversity, "diversity_ratio": diversity / real_div if diversity is not None else None}


def within_group_distance(feats: np.ndarray, groups: np.ndarray) -> float:
    """Mean over groups (e.g. prompts) of the mean pairwise feature distance inside the group."""
    return within_class_distance(feats, groups)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return torch.cdist(ta, tb).numpy()


def knn_precision(reference: np.ndarray, query: np.ndarray, k: int = 3) -> float:
    """Share of ``query`` points inside some reference point's k-NN ball (its radius = distance
    to its k-th nearest reference neighbour). precision = knn_precision(real, gen);
    recall = knn_precision(gen, real)."""
    d_ref = _pairwise(reference, reference)
    radii = np.sort(d_ref, axis=1)[:, k]  # column 0 is the point itself
    d = _pairwise(query, reference)
    return float((d <= radii[None, :]).any(axis=1).mean())


def within_class_distance(feats: np.ndarray, labels: np.ndarray) -> float:
    dists = []
    for c in np.unique(labels):
        f = feats[labels == c]
        if len(f) > 1:
            d = _pairwise(f, f)
            dists.append(d[np.triu_indices(len(f), 1)].mean())
    return float(np.mean(dists))


# ---------------------------------------------------------------------------
# mixture2d
# ---------------------------------------------------------------------------


def sliced_w2(a: torch.Tensor, b: torch.Tensor, directions: int = 256, seed: int = 0) -> float:
    """sqrt(mean over random unit directions θ of W2²(θ·a, θ·b)); equal sizes required."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_w2 needs equal-size samples, got {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], directions, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa = torch.sort(a.double() @ theta, dim=0).values
    pb = torch.sort(b.double() @ theta, dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def mode_stats(x: torch.Tensor, mix: Mixture2D, min_share_of_expected: float = 0.25) -> dict[str, float]:
    d = torch.cdist(x.double(), mix.centres.double())
    nearest = d.argmin(1)
    on_mode = d.min(1).values <= 3 * mix.std
    counts = torch.bincount(nearest[on_mode], minlength=len(mix.weights)).double()
    expected = mix.weights.double() * len(x)
    covered = (counts >= min_share_of_expected * expected).double().mean()
    shares = counts / counts.sum().clamp_min(1)
    tv = 0.5 * (shares - mix.weights.double()).abs().sum()
    return {"mode_coverage": float(covered), "mode_balance": float(1 - tv),
            "off_mode": float(1 - on_mode.double().mean())}


def score_mixture(generated: torch.Tensor, mix: Mixture2D, seed: int) -> dict[str, float]:
    real = mix.sample(len(generated), torch.Generator().manual_seed(10_000 + seed))
    return {"sliced_w2": sliced_w2(generated, real, seed=seed), **mode_stats(generated, mix)}


def mixture_floor(mix: Mixture2D, n: int, seed: int) -> dict[str, float]:
    """Real-vs-real: the metric between two independent real samples of size n."""
    a = mix.sample(n, torch.Generator().manual_seed(20_000 + seed))
    return score_mixture(a, mix, seed)
