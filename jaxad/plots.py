"""Evaluation plots a person opens: ROC curves and score histograms (PNG, matplotlib optional).

`evaluate` calls `write_evaluation_plots` after every evaluation (process 0, `eval.plots`):
  roc.png           ROC curve of every score, AUROC in the legend, chance diagonal
  score_hist.png    the headline score's histogram, normal vs anomalous test images,
                    with the decision threshold when the run has one
matplotlib is the optional `plots` extra; without it the plots are skipped with one log line.
"""
import io
import os

import numpy as np
from absl import logging

from jaxad import metrics, storage


def roc_points(scores, labels):
    """(FPR, TPR) arrays from (0, 0) to (1, 1); an image is flagged when its score >= threshold."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    tps, fps = metrics._curve(scores, labels)
    tpr = np.r_[0.0, tps / max(labels.sum(), 1)]
    fpr = np.r_[0.0, fps / max((~labels).sum(), 1)]
    return fpr, tpr


def _pyplot():
    try:
        import matplotlib
        matplotlib.use('Agg')  # files only; no display needed
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        logging.info('matplotlib is not installed: no plots (pip install -e ".[plots]")')
        return None


def _save(plt, fig, path, dpi):
    """Writes `fig` as a PNG to `path` (a local path or a URL) and closes it."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=dpi)
    plt.close(fig)
    storage.write_bytes(path, buffer.getvalue())


def write_evaluation_plots(score_dict, anomaly, headline, out_dir, title='', threshold=None):
    """Writes roc.png and score_hist.png under `out_dir`; returns their paths ([] without
    matplotlib). `score_dict`: name -> scores (higher = more anomalous); `anomaly`: 0/1."""
    plt = _pyplot()
    if plt is None:
        return []
    anomaly = np.asarray(anomaly).astype(bool)
    storage.makedirs(out_dir)
    paths = []

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, scores in score_dict.items():
        fpr, tpr = roc_points(scores, anomaly)
        auc = metrics.auroc(np.asarray(scores), anomaly)
        ax.plot(fpr, tpr, lw=2.2 if name == headline else 1.2,
                label=f'{name} (AUROC {100 * auc:.2f})')
    ax.plot([0, 1], [0, 1], ls='--', color='grey', lw=1, label='chance')
    ax.set(xlabel='false positive rate (normal flagged)',
           ylabel='true positive rate (anomalies caught)', xlim=(0, 1), ylim=(0, 1.01),
           title=f'ROC {title}'.strip())
    ax.legend(loc='lower right', fontsize=8)
    paths.append(storage.join(out_dir, 'roc.png'))
    _save(plt, fig, paths[-1], dpi=120)

    scores = np.asarray(score_dict[headline], np.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(scores, bins=40)
    ax.hist(scores[~anomaly], bins=bins, alpha=0.6, label=f'normal (n={int((~anomaly).sum())})')
    ax.hist(scores[anomaly], bins=bins, alpha=0.6, label=f'anomalous (n={int(anomaly.sum())})')
    if threshold is not None:
        ax.axvline(threshold, color='k', ls='--', lw=1.2, label=f'threshold {threshold:.4g}')
    ax.set(xlabel=f'{headline} score (higher = more anomalous)', ylabel='test images',
           title=f'Score histogram {title}'.strip())
    ax.legend(fontsize=8)
    paths.append(storage.join(out_dir, 'score_hist.png'))
    _save(plt, fig, paths[-1], dpi=120)
    return paths


def write_anomaly_overlays(images, maps, out_dir, masks=None, names=None, scores=None,
                           limit=16):
    """One PNG per image for the first `limit` images: the image, its anomaly map over it
    (colour bar in map units), and the ground-truth region's contour when `masks` is given.

    images: uint8 (N, H, W, C); maps: (N, h, w) anomaly maps, higher = more anomalous,
    resized to the image for display; masks: {0, 1} (N, H, W) or None; names: file stems
    for the PNGs; scores: image scores for the titles. Returns the paths ([] without
    matplotlib). The colour scale is shared by all images, so panels can be compared.
    """
    plt = _pyplot()
    if plt is None:
        return []
    images, maps = np.asarray(images), np.asarray(maps, np.float64)
    if images.ndim != 4 or maps.ndim != 3 or len(images) != len(maps):
        raise ValueError(f'overlays need images (N, H, W, C) and maps (N, h, w), got '
                         f'{images.shape} and {maps.shape}')
    if masks is not None and np.shape(masks) != images.shape[:3]:
        raise ValueError(f'masks {np.shape(masks)} do not match images {images.shape[:3]}')
    from PIL import Image
    storage.makedirs(out_dir)
    n = min(limit, len(images))
    vmin, vmax = float(maps[:n].min()), float(maps[:n].max())
    h, w = images.shape[1:3]
    paths = []
    for i in range(n):
        image = images[i, ..., 0] if images.shape[-1] == 1 else images[i]
        heat = np.asarray(Image.fromarray(maps[i].astype(np.float32)).resize(
            (w, h), Image.BILINEAR))
        cmap = 'gray' if image.ndim == 2 else None
        panels = 3 if masks is not None else 2
        fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4))
        axes[0].imshow(image, cmap=cmap)
        axes[0].set_title('image')
        axes[1].imshow(image, cmap=cmap)
        shown = axes[1].imshow(heat, cmap='jet', alpha=0.5, vmin=vmin, vmax=vmax)
        fig.colorbar(shown, ax=axes[1], fraction=0.046)
        title = 'anomaly map' if scores is None else f'anomaly map (score {scores[i]:.4g})'
        axes[1].set_title(title, fontsize=9)
        if masks is not None:
            axes[2].imshow(image, cmap=cmap)
            if np.any(masks[i]):
                axes[2].contour(np.asarray(masks[i], float), levels=[0.5], colors='r')
            axes[2].set_title('ground truth')
        for ax in axes:
            ax.set_axis_off()
        stem = os.path.splitext(os.path.basename(str(names[i])))[0] if names is not None \
            else 'image'
        paths.append(storage.join(out_dir, f'{i:04d}_{stem}.png'))
        _save(plt, fig, paths[-1], dpi=100)
    return paths
