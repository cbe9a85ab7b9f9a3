import json

from sdxlpipe.stages.bucket import choose, make_buckets
from tests.conftest import cli


def test_kohya_bucket_count_at_1024():
    buckets = make_buckets(1024, 64, 256, 2048)
    assert len(buckets) == 41
    assert (1024, 1024) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(w * h <= 1024 * 1024 for w, h in buckets)


def test_resize_covers_bucket_and_records_the_real_crop():
    buckets = make_buckets(1024)
    bw, bh, rw, rh, top, left = choose(1200, 800, buckets)
    assert (bw, bh) == (1216, 832)
    assert rw >= bw and rh >= bh
    # 1200x800 scaled to cover 1216x832 is 1248x832: 32 px of width trimmed, 16 each side.
    assert (rw, rh, top, left) == (1248, 832, 0, 16)


def test_buckets_command_prints_json_list():
    out = cli("buckets", "--resolution", "1024", "--json").stdout
    assert [tuple(b) for b in json.loads(out)] == make_buckets(1024)
