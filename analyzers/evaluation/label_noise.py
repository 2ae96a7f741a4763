"""Label-noise suspects: samples whose given label the model contradicts, ranked by how likely the label is wrong.

Confident learning (Northcutt et al., 2021) is the frame. Its per-class threshold t_j is the mean probability of
class j over the samples labelled j, so a class the model is always unsure about is not mistaken for a noisy one; its
confident joint C[given, true] counts the samples that are confidently of another class than their label, and its
calibration (rows scaled to the label counts, the whole to N) estimates how many labels are wrong.

The score is the probability that the label is wrong, by Bayes' rule over the true class j:

    P(wrong | x, label i) = 1 - q_i T[i|i] / sum_j q_j T[i|j]

- q: the model's probabilities divided by the class thresholds and renormalised, so that every class is read on the
  scale of its own typical confidence (1 - q_i is 1 - p(label) when all classes are equally hard);
- T[i|j] = P(label i | true class j): the calibrated confident joint's columns, with the off-diagonal part of each
  column mixed NOISE_STRUCTURE : (1 - NOISE_STRUCTURE) with the same noise rate spread evenly over the other labels.
  The confident joint mixes the model's own confusions into the label flips it counts, so its pattern is trusted only
  in part: NOISE_STRUCTURE = 1 over-trusts it (it lost to 1 - p(label) on digits with uniform flips and on
  simulations of unequal difficulty), 0 ignores which classes the flips go to (it lost to 1 - p(label) with a
  random forest on digits, and gained nothing where flips follow fixed pairs of classes: 0.85 against 0.91 for
  0.25). 0.25 was at least 1 - p(label) in precision at k on average in every setting tried (simulations of
  unequal difficulty, uniform and paired flips on digits under logistic regression, LDA, naive Bayes, k-NN and
  random forests, 5 seeds each), and within one sample of it on each seed.

`suggested_label` is the most probable true class other than the label. Every suspect gets a `reason` in words.

Which samples are suspects: the `estimated_issues` highest-scoring ones, where `estimated_issues` is confident
learning's calibrated estimate of the number of wrong labels (the calibrated joint's off-diagonal, as cleanlab's
`num_label_issues(estimation_method="off_diagonal_calibrated")`; its default `find_label_issues(filter_by=
"prune_by_noise_rate")` prunes the same counts). So the set is as large as the data say the noise is, not every
sample another class fits better (1.6 to 3 times the planted flips). The score is not cut at 0.5: with a few
percent of labels wrong, the posterior passes 0.5 only on strong evidence (about 80 of an estimated 130 on digits
under logistic regression), while the estimate itself was within 6% of the planted count there. cleanlab prunes
the same number but picks them cell by cell of the joint by margin, which on planted flips was less precise at the
same recall (tests/test_label_noise.py measures both). The known exception: many flips along fixed pairs of classes
(200 of the 1797 digits, a random pairing), where cleanlab's cells were more precise on 3 of 5 seeds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import AnalyzerError, InvalidOption
from .metrics import _check_names, check_predictions

EPS = 1e-12
TINY = np.finfo(np.float64).tiny
CHUNK_ROWS = 1 << 16  # rows of the probabilities read at a time by find_label_issues
NOISE_STRUCTURE = 0.25  # weight of the confident joint's pattern of flips against flips spread evenly (docstring)
TABLE_COLUMNS = ("id", "label", "suggested_label", "score", "reason", "confident", "p_label", "p_suggested",
                 "typical_p_label")


def class_thresholds(labels, probs) -> np.ndarray:
    """t_j: mean probability of class j over samples labelled j (1.0 for a class no sample is labelled with)."""
    labels, probs = check_predictions(labels, probs)
    k = probs.shape[1]
    count = np.bincount(labels, minlength=k)
    total = np.bincount(labels, weights=probs[np.arange(len(labels)), labels], minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.maximum(total / count, EPS), 1.0)


def confident_joint(labels, probs, thresholds=None) -> np.ndarray:
    """Counts C[given, likely]: a sample counts under the most probable class among those at or above threshold."""
    labels, probs = check_predictions(labels, probs)
    t = class_thresholds(labels, probs) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    above = probs >= t
    likely = np.where(above, probs, -1.0).argmax(1)
    has = above.any(1)
    k = probs.shape[1]
    return np.bincount(labels[has] * k + likely[has], minlength=k * k).reshape(k, k)


def calibrated_joint(labels, probs, joint=None) -> np.ndarray:
    """The confident joint as counts of (given, true) that sum to N, each row to its label's count (float, K x K)."""
    labels, probs = check_predictions(labels, probs)
    joint = confident_joint(labels, probs) if joint is None else joint
    return _calibrated(joint, np.bincount(labels, minlength=probs.shape[1]))


def _calibrated(joint, label_counts) -> np.ndarray:
    """`calibrated_joint` from the confident joint and the count of each label."""
    joint = np.asarray(joint, dtype=np.float64)
    k = len(joint)
    rows = joint.sum(1, keepdims=True)
    counts = np.asarray(label_counts, dtype=np.float64)[:, None]
    calibrated = np.divide(joint, rows, out=np.zeros((k, k)), where=rows > 0) * counts
    total = calibrated.sum()
    return calibrated * (counts.sum() / total) if total > 0 else calibrated


def estimate_issues(labels, probs, joint=None) -> int:
    """Confident learning's estimate of how many labels are wrong: the calibrated joint's off-diagonal."""
    return _off_diagonal(calibrated_joint(labels, probs, joint))


def _off_diagonal(calibrated) -> int:
    return int(round(calibrated.sum() - np.trace(calibrated)))


def noise_transitions(labels, probs, joint=None) -> np.ndarray:
    """T[i, j] = P(label i | true class j), from the calibrated joint, its pattern weighted by NOISE_STRUCTURE."""
    return _transitions(calibrated_joint(labels, probs, joint))


def _transitions(calibrated) -> np.ndarray:
    k = len(calibrated)
    columns = calibrated.sum(0, keepdims=True)
    measured = np.divide(calibrated, columns, out=np.eye(k), where=columns > 0)
    stay = np.diag(measured)
    even = np.where(np.eye(k, dtype=bool), stay[None, :], (1.0 - stay)[None, :] / (k - 1))
    return NOISE_STRUCTURE * measured + (1.0 - NOISE_STRUCTURE) * even


def _log_odds(labels, probs, thresholds, transitions) -> tuple[np.ndarray, np.ndarray]:
    """(log odds that the label is wrong (N,), most probable other true class (N,))."""
    n = len(labels)
    rows = np.arange(n)
    # the renormalisation of q cancels in the odds; zeros are clipped far below EPS, so that an overconfident
    # model's tiny probabilities still rank
    log_q = np.log(np.clip(probs, TINY, None)) - np.log(thresholds)
    log_joint = log_q + np.log(np.clip(transitions[labels], EPS, None))  # log q_j + log T[label | j]
    own = log_joint[rows, labels].copy()
    log_joint[rows, labels] = -np.inf
    suggested = log_joint.argmax(1)
    top = log_joint[rows, suggested]
    others = top + np.log(np.exp(log_joint - top[:, None]).sum(1))
    return others - own, suggested


def label_issue_scores(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """(score (N,) in [0, 1]: the probability that the label is wrong, suggested label (N,)): see the docstring."""
    labels, probs = check_predictions(labels, probs)
    from scipy.special import expit

    odds, suggested = _log_odds(labels, probs, class_thresholds(labels, probs), noise_transitions(labels, probs))
    return expit(odds), suggested


def _p(value: float) -> str:
    return "p < 0.01" if value < 0.005 else "p > 0.99" if value > 0.995 else f"p = {value:.2f}"


def suspect_reasons(table: pd.DataFrame, *, class_names=None) -> pd.Series:
    """Each suspect's reason in words, from a suspects table's label, suggested_label, p_label and p_suggested
    (and typical_p_label where present): "the model gives label 6 p = 0.02, and class 1 p = 0.95"."""
    missing = [c for c in ("label", "suggested_label", "p_label", "p_suggested") if c not in table.columns]
    if missing:
        raise AnalyzerError(f"not a label-noise suspects table: {', '.join(missing)} missing "
                            f"(pass find_label_issues(...).table or label_noise.parquet)")
    k = int(max(table["label"].max(), table["suggested_label"].max()) + 1) if len(table) else 0
    if class_names is not None:
        if len(class_names) < k:
            raise AnalyzerError(f"{len(class_names)} class names for labels up to {k - 1}: give one name per class")
        names = [str(n) for n in class_names]
    else:
        names = [str(i) for i in range(k)]
    typical = table["typical_p_label"] if "typical_p_label" in table.columns else pd.Series(np.nan, table.index)
    out = []
    for label, other, p_label, p_other, t in zip(table["label"], table["suggested_label"], table["p_label"],
                                                 table["p_suggested"], typical):
        text = f"the model gives label {names[int(label)]} {_p(float(p_label))}"
        if np.isfinite(t) and p_label < t:
            text += f" (samples labelled {names[int(label)]} average {t:.2f})"
        out.append(f"{text}, and class {names[int(other)]} {_p(float(p_other))}")
    return pd.Series(out, index=table.index, dtype=object, name="reason")


@dataclass(frozen=True)
class LabelNoise:
    """Suspects, most suspect first (`table`: TABLE_COLUMNS), the per-class thresholds, the confident joint, the
    noise transitions T[given, true] used by the score and confident learning's estimate of how many labels are
    wrong (the number of suspects, at most)."""

    table: pd.DataFrame
    thresholds: np.ndarray
    joint: np.ndarray
    transitions: np.ndarray
    estimated_issues: int

    def top(self, k: int) -> pd.DataFrame:
        return self.table.head(k)


def find_label_issues(labels, probs, *, ids=None, class_names=None, include_all: bool = False,
                      chunk_rows: int = CHUNK_ROWS) -> LabelNoise:
    """The suspects: the `estimated_issues` highest-scoring samples (module docstring), or every sample, ranked,
    with `include_all`. `class_names` words the reasons (default: class indices).

    `confident` marks samples in the confident joint's off-diagonal (another class at or above its threshold).
    `probs` is read in three passes of `chunk_rows` rows (it may be a run's memory-mapped probs.npy): the class
    thresholds, then the confident joint under them, then each sample's score, keeping only the suspects; so no
    N x K temporary is made, and the result does not depend on `chunk_rows`.
    """
    if not isinstance(include_all, (bool, np.bool_)):
        raise InvalidOption(f"include_all must be True or False, got {include_all!r}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise InvalidOption(f"chunk_rows must be a whole number of at least 1, got {chunk_rows!r}")
    labels = np.asarray(labels)
    if np.ndim(probs) != 2 or len(probs) != len(labels):
        check_predictions(labels, probs)  # says which of the two is malformed
    n, k = probs.shape
    names = None if class_names is None else _check_names(class_names, k)
    ids = np.arange(n) if ids is None else np.asarray(ids)
    if ids.shape != (n,):
        raise AnalyzerError(f"ids must have one entry per sample ({n}), got shape {ids.shape}: pass one id per row")
    chunks = [(a, min(a + chunk_rows, n)) for a in range(0, max(n, 1), chunk_rows)]

    def rows(a, b):
        return check_predictions(labels[a:b], probs[a:b])

    count, total = np.zeros(k), np.zeros(k)
    for a, b in chunks:  # pass 1: the class thresholds
        y, p = rows(a, b)
        count += np.bincount(y, minlength=k)
        total += np.bincount(y, weights=p[np.arange(len(y)), y], minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        thresholds = np.where(count > 0, np.maximum(total / np.where(count > 0, count, 1), EPS), 1.0)
    joint = np.zeros((k, k), dtype=np.int64)
    for a, b in chunks:  # pass 2: the confident joint under those thresholds
        joint += confident_joint(*rows(a, b), thresholds)
    calibrated = _calibrated(joint, count)
    transitions, estimated = _transitions(calibrated), _off_diagonal(calibrated)
    keep = n if include_all else estimated
    from scipy.special import expit

    parts = []
    for a, b in chunks:  # pass 3: every sample's odds, keeping the `keep` best of each chunk
        y, p = rows(a, b)
        odds, suggested = _log_odds(y, p, thresholds, transitions)
        order = np.lexsort((ids[a:b], -odds))[:keep]  # by odds, then id: the order of the whole table
        above = p[order] >= thresholds
        likely = np.where(above, p[order], -1.0).argmax(1)
        at = np.arange(len(order))
        parts.append(pd.DataFrame({
            "id": ids[a:b][order], "label": y[order], "suggested_label": suggested[order].astype(np.int64),
            "score": expit(odds[order]), "confident": above.any(1) & (likely != y[order]),
            "p_label": p[order][at, y[order]], "p_suggested": p[order][at, suggested[order]],
            "typical_p_label": thresholds[y[order]], "_odds": odds[order]}))
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*TABLE_COLUMNS, "_odds"])
    table = table.sort_values(["_odds", "id"], ascending=[False, True], kind="stable").head(keep)
    table = table.drop(columns="_odds").reset_index(drop=True)
    table.insert(4, "reason", suspect_reasons(table, class_names=names))
    return LabelNoise(table=table, thresholds=thresholds, joint=joint, transitions=transitions,
                      estimated_issues=estimated)


def precision_recall_at_k(ranked_ids, flipped_ids, k: int | None = None) -> tuple[float, float]:
    """Precision and recall of the first k ranked ids against known flipped ids (default k: how many flipped)."""
    flipped = set(np.asarray(flipped_ids).tolist())
    if not flipped:
        raise AnalyzerError("no flipped ids given: precision and recall need at least one known label error")
    k = len(flipped) if k is None else k
    if k < 1:
        raise AnalyzerError(f"k must be at least 1, got {k}")
    hits = len(set(np.asarray(ranked_ids)[:k].tolist()) & flipped)
    return hits / k, hits / len(flipped)
