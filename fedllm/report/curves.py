"""Validation-loss curves of every setting on one chart (the seed's Figure 3).

Site-alone and centralized training are smooth lines. A federated setting is drawn as
steps with a dot per round: its global model only changes at each round's aggregation,
so between two rounds the loss it would score stays flat. The base model, never
trained, is a horizontal dotted line.
"""

from __future__ import annotations

from fedllm.report.charts import new_figure, png_bytes
from fedllm.report.document import Picture, Section, not_recorded
from fedllm.report.run_summary import curve, display_name, is_federated, number, ordered_settings

FILE_NAME = "val_loss_curves.png"

# Sites take the qualitative colours; red and black are kept for FedAvg and centralized.
_SITE_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
_FEDERATED_COLOURS = ["tab:red", "darkred", "crimson", "salmon"]


def curves_section(summary: dict, source: str) -> Section:
    section = Section("Validation loss")
    settings = ordered_settings(summary)
    curves = {
        key: curve(setting.get("val_loss_curve"), f"{source}: settings.{key}.val_loss_curve")
        for key, setting in settings
    }
    if not any(curves.values()):
        section.blocks.append(not_recorded("Validation-loss curves"))
        return section

    figure = new_figure()
    axes = figure.add_subplot()

    def base_loss(key: str, setting: dict, points: list):
        return number(setting.get("val_loss"), f"{source}: settings.{key}.val_loss")

    plot_setting_curves(axes, settings, curves, base_loss)
    axes.set_xlabel("optimizer steps per site")
    axes.set_ylabel("loss on the combined validation set")
    axes.set_title("Validation loss during training")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    section.blocks.append(
        Picture(
            FILE_NAME,
            "Validation loss on the combined validation set of all sites. Lines: each site alone and "
            "centralized (pooled data); steps with dots: the federated global model after each round.",
            png_bytes(figure),
        )
    )
    return section


def plot_setting_curves(axes, settings: list[tuple[str, dict]], points: dict, base_value) -> None:
    """Every setting's ``points[key]`` (``(x, y)`` pairs) on ``axes``, in the report's one
    style: each site alone a coloured line, centralized black, a federated setting steps
    with a dot per round (its global model changes only at aggregation), and the base
    model a dotted horizontal line at ``base_value(key, setting, points[key])``."""
    site_colours = iter(_SITE_COLOURS * 4)
    federated_colours = iter(_FEDERATED_COLOURS * 4)
    for key, setting in settings:
        if key == "base" or setting.get("kind") == "base":
            value = base_value(key, setting, points[key])
            if value is not None:
                axes.axhline(value, color="grey", linestyle=":", linewidth=1.5, label=f"{display_name(key, setting)} (untrained)")
            continue
        if not points[key]:
            continue
        xs, ys = zip(*points[key])
        if is_federated(key, setting):
            axes.plot(xs, ys, drawstyle="steps-post", marker="o", markersize=6, linewidth=2.2,
                      color=next(federated_colours), label=f"{display_name(key, setting)} (global model per round)", zorder=3)
        elif key == "centralized" or setting.get("kind") == "centralized":
            axes.plot(xs, ys, color="black", linewidth=1.6, label=display_name(key, setting))
        else:
            axes.plot(xs, ys, color=next(site_colours), linewidth=1.4, label=f"{display_name(key, setting)} alone")
