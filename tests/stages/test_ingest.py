"""Given a folder with broken files beside good ones, ingest keeps every good one."""

import io

from PIL import Image

from sdxlpipe.config import load_config
from sdxlpipe.pipeline.runner import run_pipeline


def _png(size=(64, 48), colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _config(tmp_path, images):
    cfg = tmp_path / "sdxlpipe.toml"
    cfg.write_text(f'model = "tiny"\n[[sources]]\npath = "{images.name}"\n')
    return load_config(cfg)


def test_bad_files_are_rejected_with_reasons_and_good_ones_kept(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes(_png())
    (images / "good2.png").write_bytes(_png((48, 64), (0, 0, 200)))
    (images / "empty.png").write_bytes(b"")
    (images / "truncated.png").write_bytes(_png((256, 256))[:200])
    (images / "text.jpg").write_bytes(b"this is not a jpeg at all")
    (images / "copy.png").write_bytes(_png())  # same bytes as good.png

    report = run_pipeline(_config(tmp_path, images), "ingest")

    reasons = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in report["rejected"] if "duplicate_of" not in r}
    assert set(reasons) == {"empty.png", "truncated.png", "text.jpg"}
    (dup,) = [r for r in report["rejected"] if "duplicate_of" in r]
    assert dup["path"].endswith("good.png") and dup["duplicate_of"].endswith("copy.png")
    assert "0 bytes" in reasons["empty.png"]
    assert report["stages"]["ingest"]["items"] == 2  # good, good2; the copy is kept once


def test_exif_rotated_image_reports_its_upright_size(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    im = Image.new("RGB", (80, 40), (1, 2, 3))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90: shown as 40x80
    im.save(images / "rotated.jpg", exif=exif)
    cfg = _config(tmp_path, images)
    run_pipeline(cfg, "ingest")
    table = cfg.workspace / "tables" / "ingest.parquet"
    import pyarrow.parquet as pq

    row = pq.read_table(table).to_pylist()[0]
    assert (row["width"], row["height"]) == (40, 80)


def test_rows_name_their_source_and_the_column_changes_no_count(tmp_path):
    """Each row carries the position of its [[sources]] entry (training mixes by it); a table written
    before the column existed, or entries put in another order, count no row as changed."""
    import pyarrow.parquet as pq

    for name, colour in (("a", (200, 0, 0)), ("b", (0, 200, 0))):
        (tmp_path / name).mkdir()
        for k in range(2 if name == "a" else 1):
            (tmp_path / name / f"{k}.png").write_bytes(_png(colour=(colour[0], colour[1], k)))
    cfg_path = tmp_path / "sdxlpipe.toml"

    def run(order):
        cfg_path.write_text('model = "tiny"\n' + "".join(f'[[sources]]\npath = "{n}"\n' for n in order))
        cfg = load_config(cfg_path)
        report = run_pipeline(cfg, "ingest")
        rows = pq.read_table(cfg.workspace / "tables" / "ingest.parquet").to_pylist()
        return report["stages"]["ingest"], {(r["subset"], r["source_index"]) for r in rows}

    stats, rows = run("ab")
    assert rows == {("a", 0), ("b", 1)} and stats["computed"] == 3
    table_path = tmp_path / ".sdxlpipe" / "tables" / "ingest.parquet"
    old = pq.read_table(table_path)
    pq.write_table(old.drop_columns(["source_index"]), table_path)  # as an older sdxlpipe wrote it
    stats, rows = run("ab")
    assert stats["computed"] == 0 and stats["reused"] == 3, stats
    assert "source_index" in pq.read_table(table_path).column_names
    stats, rows = run("ba")
    assert rows == {("a", 1), ("b", 0)} and stats["computed"] == 0
