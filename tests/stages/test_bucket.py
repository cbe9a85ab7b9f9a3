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


# SDXL paper (Podell et al. 2023), App. I, as printed: height, width.
PAPER_APP_I_HEIGHT_WIDTH = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
]


def test_sdxl_preset_is_the_papers_table():
    out = json.loads(cli("buckets", "--preset", "sdxl", "--json").stdout)
    assert sorted(tuple(b) for b in out) == sorted((w, h) for h, w in PAPER_APP_I_HEIGHT_WIDTH)
    assert len(out) == 40 == len({tuple(b) for b in out})


def test_unknown_preset_is_a_user_error():
    proc = cli("buckets", "--preset", "sd15", check=False)
    assert proc.returncode == 2 and "Error: unknown bucket preset 'sd15'" in proc.stderr


def test_no_upscale_keeps_small_images_at_their_size_and_caps_large_ones():
    from sdxlpipe.stages.bucket import no_upscale_bucket

    assert no_upscale_bucket(500, 300, 1024, 64) == (448, 256)  # floored to the step, never enlarged
    w, h = no_upscale_bucket(3000, 2000, 1024, 64)
    assert w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 and abs(w / h - 1.5) < 0.05


def test_random_crop_is_seeded_by_content_and_recorded_as_the_real_offset():
    import random

    from sdxlpipe.stages.bucket import cover

    crops = {cover(1200, 800, 1216, 832, random.Random(f"0/{h}"))[4:] for h in range(20)}
    assert len(crops) > 3  # offsets really vary between images
    for top, left in crops:
        assert top == 0 and 0 <= left <= 1248 - 1216  # inside the resized image
    assert cover(1200, 800, 1216, 832, random.Random("0/a")) == cover(1200, 800, 1216, 832, random.Random("0/a"))
