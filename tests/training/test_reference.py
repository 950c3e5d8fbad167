"""The supervised reference of the evaluation: trained on the suite's own defects (never on the
test's draws), it separates them; its weights are cached by what they depend on; the report shows
it last and never in bold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from training.defects import defective_set
from training.evaluate import artifact_splits, metric_table
from training.export import load_artifact
from training.reference import NAME, SupervisedReference


def test_the_reference_learns_the_defects_it_is_shown_and_is_cached(digits_artifact: Path, tmp_path: Path,
                                                                       one_thread: None) -> None:
    module, metadata = load_artifact(digits_artifact)
    splits = artifact_splits(metadata)
    reference = SupervisedReference(module, metadata, ["missing_patch"], tmp_path, steps=300, per_kind=600,
                                    progress=False)
    reference.fit(splits)
    clean = splits.test.images[:150]
    patched, masks = defective_set(clean, "missing_patch", seed=0)      # the evaluation's own draws
    scores = reference.score(np.concatenate([clean, patched]))[NAME]
    assert roc_auc_score(np.r_[np.zeros(150), np.ones(150)], scores) > 0.8       # 0.61 after 3 steps
    maps = reference.maps(patched)[NAME]
    assert maps.shape == masks.shape
    assert roc_auc_score(masks.ravel(), maps.ravel()) > 0.75             # it points at the patch
    cached = list(tmp_path.glob("reference-*.pt"))
    assert len(cached) == 1
    again = SupervisedReference(module, metadata, ["missing_patch"], tmp_path, steps=300, per_kind=600,
                                progress=False)
    again.fit(splits)                                                     # loads, does not retrain
    assert np.array_equal(again.score(clean)[NAME], reference.score(clean)[NAME])
    other = SupervisedReference(module, metadata, ["scratch"], tmp_path, steps=300, per_kind=600, progress=False)
    assert other._digest() != again._digest()                             # other kinds, other weights


def test_the_reference_is_never_the_bold_best() -> None:
    metrics = {"vae:fused": {"blur": {"auroc": 0.8}}, "PCA recon": {"blur": {"auroc": 0.6}},
               NAME: {"blur": {"auroc": 0.95}}}
    table = metric_table(metrics, "auroc", list(metrics))
    assert "| blur | **0.800** | 0.600 | 0.950 |" in table


def test_the_reference_builds_the_artifacts_own_levels_and_keys_them(digits_artifact: Path, tmp_path: Path) -> None:
    module, metadata = load_artifact(digits_artifact)

    def with_levels(levels: int | None) -> dict:
        segmenter = {k: v for k, v in metadata["score"]["segmenter"].items() if k != "levels"}
        segmenter |= {} if levels is None else {"levels": levels}
        return {**metadata, "score": {**metadata["score"], "segmenter": segmenter}}

    old, two, deep = (SupervisedReference(module, with_levels(levels), ["scratch"], tmp_path, steps=2, progress=False)
                      for levels in (None, 2, 3))             # None: an artifact made before levels were recorded
    assert (old.levels, two.levels, deep.levels) == (2, 2, 3)
    assert deep._digest() not in (old._digest(), two._digest())     # other network, other cached weights
    deep.fit(artifact_splits(metadata))
    assert deep.segmenter is not None and deep.segmenter.levels == 3
