"""Pictures of a run: the loss curve (with the held-out scores, where the run took them) and the
allocation histograms, from its run log."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .config import read_raw  # noqa: E402
from .runlog import read_log, write_atomically  # noqa: E402


def plot_run(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    log = read_log(run_dir, "run_log").to_pydict()
    steps = np.array(log["step"])
    queries = np.cumsum(log["queries"])
    fig, (ax_loss, ax_alloc) = plt.subplots(1, 2, figsize=(11, 4))
    loss = np.array(log["loss"], float)
    ax_loss.plot(queries, loss, alpha=0.35, label="batch loss")
    window = max(1, len(loss) // 20)
    if len(loss) >= window:
        ax_loss.plot(queries[window - 1:], np.convolve(loss, np.ones(window) / window, "valid"),
                     label=f"mean of {window} steps")
    ax_loss.set(xlabel="queries spent", ylabel="clean train loss", title="loss")
    test = np.array(log["test_metric"], float)  # NaN (or null, in an older log) where not scored
    scored, curves = ~np.isnan(test), [ax_loss]
    if scored.any():
        metric = read_raw(run_dir / "config.json")["data"]["metric"]
        ax_test = ax_loss.twinx()
        ax_test.plot(queries[scored], test[scored], "o-", color="C3", label=f"held-out {metric}")
        ax_test.set_ylabel(f"held-out {metric}")
        curves.append(ax_test)
    ax_loss.legend(handles=[h for ax in curves for h in ax.get_legend_handles_labels()[0]])  # one for both y axes
    thirds = np.array_split(np.arange(len(steps)), 3)
    for part, name in zip(thirds, ("early", "middle", "late")):
        if len(part):
            values = np.concatenate([log["allocation"][i] for i in part])
            ax_alloc.hist(values, bins=np.arange(values.min(), values.max() + 2) - 0.5, histtype="step", linewidth=2,
                          density=True, label=f"{name} steps {steps[part[0]]}-{steps[part[-1]]}")
    ax_alloc.set(xlabel="queries per example (units)", ylabel="fraction of examples", title="allocation")
    ax_alloc.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    return [write_atomically(run_dir, "run.png", image.getvalue())]
