"""Pictures for MLflow that people would rather look at than read: the confusion matrix, and val images with
their true and predicted labels. Rendered with matplotlib's object API on an Agg canvas (no pyplot, no display,
safe in the logger's background thread) into PIL images."""
from __future__ import annotations

import numpy as np

__all__ = ["confusion_matrix_image", "prediction_grid_image", "segmentation_grid_image", "class_palette", "colour_mask",
           "detection_grid_image", "reconstruction_grid_image", "generation_grid_image"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _to_pil(fig):
    from PIL import Image

    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy())


def confusion_matrix_image(counts: np.ndarray, class_names: list[str], title: str = ""):
    """Rows = true class, columns = predicted, colour = share of the row; counts written in when it stays legible."""
    counts = np.asarray(counts, dtype=np.int64)
    c = counts.shape[0]
    names = list(class_names) if len(class_names) == c else [str(i) for i in range(c)]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.45 * c, 24)
    fig = _figure(side, side * 0.9)
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if c <= 40:
        ax.set_xticks(range(c), names, rotation=90 if c > 10 else 0, fontsize=8)
        ax.set_yticks(range(c), names, fontsize=8)
    if c <= 25:
        for i in range(c):
            for j in range(c):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    acc = np.trace(counts) / max(counts.sum(), 1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title + ': ' if title else ''}{int(counts.sum()):,} val images, top-1 {acc:.3f}")
    fig.tight_layout()
    return _to_pil(fig)


def prediction_grid_image(images: np.ndarray, labels: np.ndarray, preds: np.ndarray, probs: np.ndarray,
                          class_names: list[str], title: str = ""):
    """uint8 images (N, 3, H, W) or (N, H, W, 3) with 'true -> predicted (p)' above each, red when wrong."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)
    n = len(images)
    cols = min(8, max(n, 1))
    rows = max(1, -(-n // cols))
    fig = _figure(cols * 1.6, rows * 1.8 + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)

    def name(i: int) -> str:
        return class_names[i] if 0 <= i < len(class_names) else str(i)

    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(images[k], interpolation="nearest")
        ok = int(labels[k]) == int(preds[k])
        ax.set_title(f"{name(int(labels[k]))} → {name(int(preds[k]))}\n({float(probs[k]):.2f})", fontsize=7,
                     color="darkgreen" if ok else "red")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _to_pil(fig)


def class_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, one per class id: tab20's, black for class 0 (background in vitray's mask sets)."""
    from matplotlib import colormaps

    tab = (np.asarray(colormaps["tab20"].colors) * 255).astype(np.uint8)
    out = np.concatenate([np.zeros((1, 3), np.uint8), tab[np.arange(max(n - 1, 0)) % len(tab)]])
    return out[:max(n, 1)]


def colour_mask(mask: np.ndarray, n: int, ignore: int = 255) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) colours; ignored pixels white."""
    palette = np.concatenate([class_palette(n), np.full((256 - max(n, 1), 3), 255, np.uint8)])
    palette[ignore] = 255
    return palette[np.asarray(mask, dtype=np.uint8)]


def segmentation_grid_image(images: np.ndarray, truths: np.ndarray, preds: np.ndarray, class_names: list[str],
                            title: str = ""):
    """One row per val image: the image, its true mask and the predicted mask (class colours, legend below)."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)
    n = min(len(images), 8)
    c = max(len(class_names), int(max(np.asarray(preds).max(initial=0), 0)) + 1)
    fig = _figure(3 * 1.6, n * 1.6 + 0.9)
    axes = fig.subplots(max(n, 1), 3, squeeze=False)
    for k in range(axes.shape[0]):
        for j, ax in enumerate(axes[k]):
            ax.axis("off")
            if k >= n:
                continue
            ax.imshow(images[k] if j == 0 else colour_mask((truths if j == 1 else preds)[k], c), interpolation="nearest")
            if k == 0:
                ax.set_title(("image", "truth", "prediction")[j], fontsize=8)
    from matplotlib.patches import Patch

    palette = class_palette(c) / 255.0
    names = [class_names[i] if i < len(class_names) else str(i) for i in range(c)]
    fig.legend(handles=[Patch(color=palette[i], label=names[i]) for i in range(c)], loc="lower center",
               ncol=min(c, 6), fontsize=6, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _to_pil(fig)


def detection_grid_image(samples: list, class_names: list[str], min_score: float = 0.25, title: str = ""):
    """Val images with their true boxes (white, dashed) and predicted boxes at or above ``min_score`` (class colours,
    label and score). ``samples``: (image (3, H, W) uint8, true boxes, true labels, boxes, scores, labels), boxes
    xyxy in the image's pixels."""
    from matplotlib.patches import Rectangle

    n = min(len(samples), 16)
    cols = min(4, max(n, 1))
    rows = max(1, -(-n // cols))
    palette = class_palette(max(len(class_names), 1) + 1)[1:] / 255.0
    fig = _figure(cols * 2.2, rows * 2.2 + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= n:
            continue
        image, tboxes, tlabels, boxes, scores, labels = samples[k]
        img = np.asarray(image)
        ax.imshow(img.transpose(1, 2, 0) if img.ndim == 3 and img.shape[0] == 3 else img, interpolation="nearest")
        for (x0, y0, x1, y1) in np.asarray(tboxes).reshape(-1, 4):
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", lw=0.8, ls="--"))
        for (x0, y0, x1, y1), s, c in zip(np.asarray(boxes).reshape(-1, 4), scores, labels):
            if s < min_score:
                continue
            colour = palette[int(c) % len(palette)]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.2))
            name = class_names[int(c)] if int(c) < len(class_names) else str(int(c))
            ax.text(x0, y0, f"{name} {s:.2f}", fontsize=5, color="black", va="bottom",
                    bbox={"facecolor": colour, "pad": 0.5, "lw": 0})
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return _to_pil(fig)


def reconstruction_grid_image(originals: np.ndarray, masked: np.ndarray, recon: np.ndarray, pasted: np.ndarray,
                              title: str = ""):
    """MAE: one row per val image: the image, what the encoder saw (masked patches grey), the decoder's
    reconstruction of every patch, and the reconstruction with the visible patches pasted back. (N, H, W, 3) uint8."""
    n = min(len(originals), 8)
    heads = ("original", "masked", "reconstruction", "reconstruction + visible")
    fig = _figure(4 * 1.5, n * 1.5 + 0.5)
    axes = fig.subplots(max(n, 1), 4, squeeze=False)
    for k in range(axes.shape[0]):
        for j, ax in enumerate(axes[k]):
            ax.axis("off")
            if k >= n:
                continue
            ax.imshow((originals, masked, recon, pasted)[j][k], interpolation="nearest")
            if k == 0:
                ax.set_title(heads[j], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _to_pil(fig)


def generation_grid_image(prompts: list[str], samples: np.ndarray, real: np.ndarray | None = None, title: str = ""):
    """Generation: one row per prompt, its generated samples (P, K, H, W, 3) uint8 side by side, and a real image
    of that prompt in the first column when ``real`` (P, H, W, 3) is given."""
    p, k = samples.shape[:2]
    cols = k + (real is not None)
    fig = _figure(max(cols * 1.2, 4.0), p * 1.3 + 0.5)
    axes = fig.subplots(max(p, 1), cols, squeeze=False)
    for r in range(axes.shape[0]):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if r >= p:
                continue
            if real is not None and c == 0:
                ax.imshow(real[r], interpolation="nearest")
            else:
                ax.imshow(samples[r, c - (real is not None)], interpolation="nearest")
        if r < p:
            axes[r][0].text(0, 1.04, prompts[r][:90], transform=axes[r][0].transAxes, fontsize=7, va="bottom")
    if real is not None:
        title = f"{title}; first column: a real image with that caption" if title else "first column: a real image"
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _to_pil(fig)
