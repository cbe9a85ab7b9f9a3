import json
import math

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
    from sdxlpipe.stages.bucket import no_upscale

    assert no_upscale(500, 300, 1024, 64)[:4] == (448, 256, 500, 300)  # floored to the step, never enlarged
    w, h = no_upscale(3000, 2000, 1024, 64)[:2]
    assert w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 and abs(w / h - 1.5) < 0.05


def test_random_crop_is_seeded_by_content_and_recorded_as_the_real_offset():
    import random

    from sdxlpipe.stages.bucket import cover

    crops = {cover(1200, 800, 1216, 832, random.Random(f"0/{h}"))[4:] for h in range(20)}
    assert len(crops) > 3  # offsets really vary between images
    for top, left in crops:
        assert top == 0 and 0 <= left <= 1248 - 1216  # inside the resized image
    assert cover(1200, 800, 1216, 832, random.Random("0/a")) == cover(1200, 800, 1216, 832, random.Random("0/a"))


# --- kohya's resize math (decision 56) -----------------------------------------------------------------------------

def _kohya_resize(width: int, height: int, reso: tuple[int, int]) -> tuple[int, int]:
    """kohya-ss/sd-scripts library/train_util.py, BucketManager.select_bucket (not no_upscale), once the bucket is
    chosen: scale so one side meets the bucket (which one by aspect ratio), the other rounded half up."""
    aspect_ratio = width / height
    if aspect_ratio > reso[0] / reso[1]:
        scale = reso[1] / height
    else:
        scale = reso[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


def _kohya_no_upscale(width: int, height: int, max_area: int, steps: int):
    """The same function's no_upscale branch: (bucket, resized size). Its round_to_steps rounds half up to a
    whole pixel, then floors to the step."""
    def round_to_steps(x):
        x = int(x + 0.5)
        return x - x % steps

    aspect_ratio = width / height
    if width * height > max_area:
        resized_width = math.sqrt(max_area * aspect_ratio)
        resized_height = max_area / resized_width
        b_width_rounded = round_to_steps(resized_width)
        b_height_in_wr = round_to_steps(b_width_rounded / aspect_ratio)
        ar_width_rounded = b_width_rounded / b_height_in_wr
        b_height_rounded = round_to_steps(resized_height)
        b_width_in_hr = round_to_steps(b_height_rounded * aspect_ratio)
        ar_height_rounded = b_width_in_hr / b_height_rounded
        if abs(ar_width_rounded - aspect_ratio) < abs(ar_height_rounded - aspect_ratio):
            resized_size = (b_width_rounded, int(b_width_rounded / aspect_ratio + 0.5))
        else:
            resized_size = (int(b_height_rounded * aspect_ratio + 0.5), b_height_rounded)
    else:
        resized_size = (width, height)
    return (resized_size[0] - resized_size[0] % steps, resized_size[1] - resized_size[1] % steps), resized_size


def _kohya_centre_trim(resized: tuple[int, int], reso: tuple[int, int]) -> tuple[int, int]:
    """train_util.trim_and_resize_if_required without random_crop: (top, left) = trim // 2 on each axis."""
    return (resized[1] - reso[1]) // 2, (resized[0] - reso[0]) // 2


def _sizes():
    import random

    rng = random.Random(5)
    fixed = [(1200, 800), (800, 1200), (1024, 1024), (640, 427), (427, 640), (1000, 700), (3000, 2000), (1921, 1081),
             (500, 300), (4000, 1000), (333, 777)]
    return fixed + [(rng.randint(300, 4000), rng.randint(300, 4000)) for _ in range(400)]


def _bucket_stage(sizes, **params):
    import pyarrow as pa

    from sdxlpipe.stages import bucket

    table = pa.table({"width": [w for w, _ in sizes], "height": [h for _, h in sizes],
                      "content_hash": [f"{i:032x}" for i in range(len(sizes))]})
    out = bucket.run(table, bucket.Params(**params), None).to_pydict()
    return [tuple(out[c][i] for c in bucket.OUTPUT_COLUMNS) for i in range(len(sizes))]


def test_resize_and_centre_crop_are_kohyas_for_the_chosen_bucket():
    """kohya's rule (users compare our buckets with kohya's; diffusers' SDXL script has no buckets): the side that
    fits is the bucket's, the other is rounded half up (kohya-ss/sd-scripts library/train_util.py,
    BucketManager.select_bucket: int(x * scale + 0.5)), the overflow trimmed by trim // 2
    (trim_and_resize_if_required). We rounded up before: a 640x427 image into 1216x832 was resized to 1248 wide, not 1247."""
    for (w, h), (bw, bh, rw, rh, top, left) in zip(_sizes(), _bucket_stage(_sizes())):
        resized = _kohya_resize(w, h, (bw, bh))
        assert (rw, rh) == resized, (w, h, bw, bh)
        assert (top, left) == _kohya_centre_trim(resized, (bw, bh)), (w, h, bw, bh)


def test_no_upscale_buckets_resize_and_crop_are_kohyas():
    """bucket_no_upscale as kohya's select_bucket does it: an image under resolution^2 is never resized, only
    trimmed to its size floored to the step; a larger one is resized to kohya's rounded size (not to cover its
    bucket). Before, we floored each side to the step and then resized to cover that bucket (a 1000x700 image became
    960x672 and lost its top 16 rows instead of 60 rows trimmed 30/30)."""
    for (w, h), (bw, bh, rw, rh, top, left) in zip(_sizes(), _bucket_stage(_sizes(), no_upscale=True)):
        reso, resized = _kohya_no_upscale(w, h, 1024 * 1024, 64)
        assert ((bw, bh), (rw, rh)) == (reso, resized), (w, h)
        assert (top, left) == _kohya_centre_trim(resized, reso), (w, h)


def test_square_images_keep_their_resize_and_crop():
    """A square image scales exactly, so its resize (and so its latent's key) is the same under either rule."""
    rows = _bucket_stage([(2048, 2048), (1024, 1024), (512, 512), (1536, 1536)])
    assert rows == [(1024, 1024, 1024, 1024, 0, 0)] * 4
