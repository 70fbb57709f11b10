"""tailkd.plots: what each figure draws (series data, labels, legends, scales), read back from the Figure rather
than the pixels, and the PNG written by an atomic replace."""

from pathlib import Path

import numpy as np
import pytest

from tailkd import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def drawn(monkeypatch):
    """The Figures the plots turn into PNG bytes, in order (each is still drawn and written as usual)."""
    figures = []
    real = plots._png

    def png(fig):
        figures.append(fig)
        return real(fig)

    monkeypatch.setattr(plots, "_png", png)
    return figures


def _band_ys(collection) -> set:
    """The y values of a fill_between band's outline (its lower and upper curves)."""
    return {round(float(y), 9) for y in collection.get_paths()[0].vertices[:, 1]}


def _statistics(alpha_mean, rate):
    k = list(range(1, len(alpha_mean) + 1))
    return {"k": k, "alpha_mean": alpha_mean, "alpha_median": [a - 0.1 for a in alpha_mean],
            "alpha_q25": [a - 0.2 for a in alpha_mean], "alpha_q75": [a + 0.05 for a in alpha_mean],
            "mismatch_rate": rate}


def test_tail_mass_figure_draws_each_teachers_curves_band_and_mismatch_bar(tmp_path, drawn):
    """Fig. 2: per teacher the mean α_K (labelled by the shortest distinct path tail), the median and the q25–q75
    band, and its mismatch rate in percent; the tail mass axis is [0, 1]."""
    results = {"/m/a/final": _statistics([0.8, 0.5, 0.3], 0.4), "/m/b/final": _statistics([0.6, 0.4, 0.2], 0.25)}
    path = plots.plot_tail_mass(results, tmp_path / "f.png")
    assert path == tmp_path / "f.png" and path.read_bytes()[:8] == PNG_SIGNATURE
    assert plots.tail_mass_png(results)[:8] == PNG_SIGNATURE
    ax_a, ax_b = drawn[0].axes
    assert [t.get_text() for t in ax_a.get_legend().get_texts()] == ["a/final (mean)", "b/final (mean)"]
    for i, r in enumerate(results.values()):
        mean, median = ax_a.lines[2 * i], ax_a.lines[2 * i + 1]
        assert list(mean.get_xdata()) == [1, 2, 3] and list(mean.get_ydata()) == r["alpha_mean"]
        assert list(median.get_ydata()) == r["alpha_median"] and median.get_linestyle() == "--"
        assert _band_ys(ax_a.collections[i]) == {round(y, 9) for y in r["alpha_q25"] + r["alpha_q75"]}
    assert ax_a.get_ylim() == (0, 1) and ax_a.get_xlabel() == "K (top-K teacher tokens)"
    assert [b.get_height() for b in ax_b.patches] == [40.0, 25.0] and ax_b.get_ylim() == (0, 100)
    assert [t.get_text() for t in ax_b.texts] == ["40.0%", "25.0%"]
    assert [t.get_text() for t in ax_b.get_xticklabels()] == ["a/final", "b/final"]


def test_short_names_keep_the_fewest_path_parts_that_tell_names_apart():
    assert plots.short_names(["/m/t1", "/m/t2"]) == ["t1", "t2"]
    assert plots.short_names(["/x/a/final", "/x/b/final"]) == ["a/final", "b/final"]
    assert plots.short_names(["/p/a/b/final", "/q/a/b/final"]) == ["/p/a/b/final", "/q/a/b/final"]  # 3 not enough


def test_seed_bands_draw_the_mean_and_the_min_max_band_over_the_shortest_curve(tmp_path, drawn):
    """Fig. 1 over seeds: an unfinished seed's shorter curve cuts every curve of its label to its length; the line
    is the mean over the seeds, the band their min–max, drawn only where there are two seeds or more."""
    curves = {"KD": [([0, 10, 20], [3.0, 2.0, 1.0]), ([0, 10], [5.0, 4.0])], "TAD": [([0, 10, 20], [2.0, 1.0, 0.5])],
              "CLM": []}
    plots.plot_seed_bands(curves, tmp_path / "f.png")
    ax = drawn[0].axes[0]
    kd, tad = ax.lines
    assert list(kd.get_xdata()) == [0, 10] and list(kd.get_ydata()) == [4.0, 3.0]
    assert list(tad.get_xdata()) == [0, 10, 20] and list(tad.get_ydata()) == [2.0, 1.0, 0.5]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["KD (mean of 2 seeds)", "TAD (mean of 1 seed)"]
    assert len(ax.collections) == 1 and _band_ys(ax.collections[0]) == {3.0, 2.0, 5.0, 4.0}
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG_SIGNATURE


def test_sweeps_plot_each_sweep_in_increasing_order_on_a_log2_axis(tmp_path, drawn):
    plots.plot_sweeps({4.0: 1.0, 1.0: 3.0, 2.0: 1.5}, {10: 1.5, 5: 1.8}, tmp_path / "s.png")
    beta, k = drawn[0].axes
    assert list(beta.lines[0].get_xdata()) == [1.0, 2.0, 4.0] and list(beta.lines[0].get_ydata()) == [3.0, 1.5, 1.0]
    assert list(k.lines[0].get_xdata()) == [5, 10] and list(k.lines[0].get_ydata()) == [1.8, 1.5]
    assert (beta.get_xlabel(), k.get_xlabel()) == ("β", "K") and beta.get_xscale() == k.get_xscale() == "log"
    assert [t.get_text() for t in beta.get_xticklabels()] == ["1", "2", "4"]


def test_heldout_kl_draws_one_line_per_run(tmp_path, drawn):
    plots.plot_heldout_kl({"kd": ([0, 1000], [3.0, 1.6]), "tad": ([0, 1000], [2.5, 1.2])}, tmp_path / "h.png")
    ax = drawn[0].axes[0]
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines] == [([0, 1000], [3.0, 1.6]),
                                                                                       ([0, 1000], [2.5, 1.2])]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["kd", "tad"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("training tokens", "held-out KL(teacher‖student) [nats/token]")


def test_fidelity_diversity_puts_each_run_at_its_distinct_2_and_one_minus_self_bleu(tmp_path, drawn):
    plots.plot_fidelity_diversity({"kd": {"rougeL": 0.3, "distinct_2": 0.6, "self_bleu": 0.2},
                                   "tad": {"rougeL": 0.4, "distinct_2": 0.7, "self_bleu": 0.1}}, tmp_path / "f.png")
    a, b = drawn[0].axes
    assert [c.get_offsets().tolist() for c in a.collections] == [[[0.6, 0.3]], [[0.7, 0.4]]]
    assert np.allclose([c.get_offsets()[0] for c in b.collections], [[0.8, 0.3], [0.9, 0.4]], rtol=0, atol=1e-15)
    assert [t.get_text() for t in b.texts] == ["kd", "tad"]


def test_training_curves_draw_kl_where_any_row_has_it_and_every_nonzero_loss_term(tmp_path, drawn):
    """A run's curves: held-out KL from the rows that have it (a first row of the CLM alone is left out), its
    first and last values written beside the points; each training-loss term drawn unless it is zero throughout
    (CLM is 0 at the first step here: still drawn); the run's name as the title."""
    heldout = [{"tokens": 0, "student_clm": 4.0}, {"tokens": 10, "kl": 2.0, "student_clm": 3.0},
               {"tokens": 20, "kl": 1.5}, {"tokens": 30, "kl": 1.25}]
    train = [{"tokens": 10, "loss": 3.0, "clm": 0.0, "div": 0.0}, {"tokens": 20, "loss": 2.0, "clm": 1.0, "div": 0.0}]
    plots.plot_training_curves(train, heldout, tmp_path / "c.png", title="kd-s0")
    fig = drawn[0]
    a, b = fig.axes
    assert list(a.lines[0].get_xdata()) == [10, 20, 30] and list(a.lines[0].get_ydata()) == [2.0, 1.5, 1.25]
    assert [t.get_text() for t in a.texts] == ["2", "1.25"] and a.get_title() == "(a) held-out KL"
    assert [t.get_text() for t in b.get_legend().get_texts()] == ["loss (total)", "CLM"]
    assert [list(line.get_ydata()) for line in b.lines] == [[3.0, 2.0], [0.0, 1.0]]
    assert fig._suptitle.get_text() == "kd-s0"


def test_a_figure_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails part-way (a full disk) leaves the earlier picture as it was: the PNG is written under
    a temporary name and renamed."""
    path = tmp_path / "s.png"
    plots.plot_sweeps({1.0: 1.0}, {5: 1.0}, path)
    before = path.read_bytes()
    real = Path.write_bytes

    def full_disk(self, data):
        real(self, data[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        plots.plot_sweeps({1.0: 2.0, 2.0: 1.0}, {5: 1.0}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]
