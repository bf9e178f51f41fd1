"""Text from users' datasets in the run report: class names drawn into figures as plain text (a "$" does not
start matplotlib's math mode, whose parser fails on an unknown command), and every string in the HTML escaped."""
from engine.report import ReportInputs, ResultRow, write_report
from engine.data.shards import SyntheticSet
from engine.storage import Storage
from engine.testing.parquet import png
from engine.testing.synthetic import write_synthetic_set

NAMES = [r"cost $\undefined$", "<img src=x onerror=alert(1)>", "plain"]


def test_dataset_text_is_plain_in_figures_and_escaped_in_html(tmp_path):
    images = [png(40 * i, size=16) for i in range(9)]
    labels = [i % 3 for i in range(9)]
    write_synthetic_set(str(tmp_path / "syn"), Storage(), NAMES, images, labels, num_rows=30, rows_per_file=30,
                        clip_threshold=0.2)
    sset = SyntheticSet.open(str(tmp_path / "syn"))
    inputs = ReportInputs(title="<script>alert('title')</script>", class_names=NAMES,
                          real_images={f"real-{i}": b for i, b in enumerate(images)}, grid_set=sset, score_set=sset,
                          results=[ResultRow("<b>m</b>", "diff-mix", 0.1, 0.5, [0.6], note="a & b")],
                          notes=["<i>note</i>"])
    page = write_report(inputs, str(tmp_path / "report"), Storage())
    text = open(page).read()
    assert (tmp_path / "report" / "grid.png").stat().st_size > 1000          # drawn with the "$" names
    for raw in ("<script>", "<img src=x", "<b>m</b>", "<i>note</i>"):
        assert raw not in text
    assert "&lt;script&gt;" in text and "&lt;b&gt;m&lt;/b&gt;" in text and "a &amp; b" in text
