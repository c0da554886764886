"""Evaluation plots a person opens: ROC curves and score histograms (PNG, matplotlib optional).

`evaluate` calls `write_evaluation_plots` after every evaluation (process 0, `eval.plots`):
  roc.png           ROC curve of every score, AUROC in the legend, chance diagonal
  score_hist.png    the headline score's histogram, normal vs anomalous test images,
                    with the decision threshold when the run has one
matplotlib is the optional `plots` extra; without it the plots are skipped with one log line.
"""
import os

import numpy as np
from absl import logging

from jaxad import metrics


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


def write_evaluation_plots(score_dict, anomaly, headline, out_dir, title='', threshold=None):
    """Writes roc.png and score_hist.png under `out_dir`; returns their paths ([] without
    matplotlib). `score_dict`: name -> scores (higher = more anomalous); `anomaly`: 0/1."""
    plt = _pyplot()
    if plt is None:
        return []
    anomaly = np.asarray(anomaly).astype(bool)
    os.makedirs(out_dir, exist_ok=True)
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
    paths.append(os.path.join(out_dir, 'roc.png'))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

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
    paths.append(os.path.join(out_dir, 'score_hist.png'))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
