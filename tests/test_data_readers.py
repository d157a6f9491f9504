"""Raw image-text readers on real data (sklearn digits) and the real SeaweedFS S3 server.

Every layout (parquet, WebDataset tar, image folder) is read locally and from S3 through Ray Data,
with planted bad samples: a truncated image, a missing caption, a blank caption, a 4×4 image (and,
where a layout can hold one, a caption without an image). They must be skipped and counted per
shard and reason; a shard over the bad-share limit must stop the read with its name.
"""

from __future__ import annotations

import numpy as np
import pytest

from twinflow.config import ConfigError, build
from twinflow.data import (BadDataError, DataSourceError, DatasetConfig, filesystem_for, iter_decoded, new_ledger,
                           read_image_text)
from twinflow.data.config import EMPTY_CAPTION, NO_CAPTION, NO_IMAGE, TOO_SMALL, UNDECODABLE
from twinflow.data.digits import caption_for, digit_images, write_digits_dataset
from twinflow.data.ingest import find_bad_data_error
from twinflow.data.transforms import decode_image, make_buckets, nearest_bucket, to_model_pixels

BAD = {UNDECODABLE: 1, NO_CAPTION: 1, EMPTY_CAPTION: 1, TOO_SMALL: 1}


def _cfg(source: str, fmt: str, **kw) -> DatasetConfig:
    base = dict(source=source, resolution=32, min_size=16, bad_share_limit=0.5, files_per_shard=14,
                decode_num_cpus=0.5)
    base.update(kw)
    return DatasetConfig(**base)


def _write(uri: str, fmt: str, **kw):
    bad = dict(BAD, **({NO_IMAGE: 1} if fmt != "folder" else {}))
    # 20 good digits over 2 shards; shard 0 also holds the bad ones (10 good + 4 or 5 bad).
    # folder shards are runs of files_per_shard images: 14 = shard 0's 10 good + 4 bad images.
    return write_digits_dataset(uri, fmt, n=20, shards=2, size=32, bad=bad, **kw)


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("fmt", ["parquet", "webdataset", "folder"])
def test_reader_skips_and_counts_bad_samples(fmt, where, tmp_path, s3_env, ray_local):
    if where == "s3":
        uri = s3_env.create_bucket("readers") + f"/{fmt}"
    else:
        uri = str(tmp_path / fmt)
    info = _write(uri, fmt, image_format="png")
    cfg = _cfg(uri, fmt)
    ledger = new_ledger()
    rows = read_image_text(cfg, ledger=ledger).take_all()

    assert len(rows) == info.ok == 20
    assert all(r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8 for r in rows)
    want = [caption_for(label, i) for i, (label, _) in enumerate(digit_images(20))]
    assert sorted(r["text"] for r in rows) == sorted(want)
    stats = {s["shard"]: s for s in ray_local.get(ledger.all.remote())}
    assert len(stats) == 2
    by_order = [stats[k] for k in sorted(stats)]
    for got, want in zip(by_order, info.shards):
        assert (got["seen"], got["ok"], got["skipped"]) == (want["seen"], want["ok"], want["skipped"])
    assert by_order[0]["skipped"][UNDECODABLE] == 1 and by_order[0]["skipped"][NO_CAPTION] == 1

    # The Ray path and the in-process path decode to the same pixels.
    local = {k: (img, text) for k, img, text in iter_decoded(cfg)}
    for r in rows[:5]:
        img, text = local[r["key"]]
        assert text == r["text"] and np.array_equal(img, r["image"])


@pytest.mark.ray
def test_bad_share_limit_stops_with_the_shard_name(tmp_path, ray_local):
    uri = str(tmp_path / "pq")
    # shard 1 holds 4 bad of 14 samples (29 %) > 20 %
    write_digits_dataset(uri, "parquet", n=20, shards=2, bad=BAD, bad_shard=1)
    cfg = _cfg(uri, "parquet", bad_share_limit=0.2)
    with pytest.raises(BadDataError, match=r"shard-00001\.parquet: 4 of 14 samples unusable .*bad_share_limit=0\.2"):
        list(iter_decoded(cfg))
    with pytest.raises(Exception) as info:  # through Ray: wrapped by the task error, found inside
        read_image_text(cfg).take_all()
    bad = find_bad_data_error(info.value)
    assert bad is not None and str(bad).startswith("shard ") and "shard-00001.parquet: 4 of 14" in str(bad)
    # raising the limit lets the same data through, bad samples skipped
    assert len(list(iter_decoded(_cfg(uri, "parquet", bad_share_limit=0.3)))) == 20


def test_parquet_reference_column_names_and_jpeg(tmp_path):
    """The TwinFlow reference's parquet uses ``image_bytes``; it is found without configuration."""
    uri = str(tmp_path / "ref")
    write_digits_dataset(uri, "parquet", n=6, shards=1, image_column="image_bytes", text_column="text",
                         image_format="jpeg")
    rows = list(iter_decoded(_cfg(uri, "parquet")))
    assert len(rows) == 6 and rows[0][2] == caption_for(digit_images(1)[0][0], 0)
    custom = str(tmp_path / "custom")
    write_digits_dataset(custom, "parquet", n=4, shards=1, image_column="pixels_png", text_column="alt")
    with pytest.raises(BadDataError, match="no image column 'image'.*set data.image_column"):
        list(iter_decoded(_cfg(custom, "parquet")))
    assert len(list(iter_decoded(_cfg(custom, "parquet", image_column="pixels_png", text_column="alt")))) == 4


def test_center_crop_resize_and_normalisation():
    from io import BytesIO

    from PIL import Image

    # a 60x30 image: left third red, middle third green, right third blue
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:, :20, 0] = 255
    arr[:, 20:40, 1] = 255
    arr[:, 40:, 2] = 255
    buf = BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), DatasetConfig(source="x", resolution=16, min_size=8))
    assert out.shape == (16, 16, 3)
    # the centre square is columns 15..45 (5 red, 20 green, 5 blue), scaled to 16: the middle is green
    assert out[:, 6:10, 1].min() > 200 and out[:, 6:10, 0].max() < 60
    px = to_model_pixels(np.stack([np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8)]))
    assert px.shape == (2, 3, 16, 16) and px[0].eq(-1).all() and px[1].eq(1).all()


def test_aspect_buckets_cover_the_area_with_sides_divisible_by_16():
    buckets = make_buckets(512, 2.0)
    assert (512, 512) in buckets
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0 and max(h, w) / min(h, w) <= 2.0
        assert abs(h * w - 512 * 512) / (512 * 512) < 0.1
    wide, tall = nearest_bucket(300, 600, buckets), nearest_bucket(600, 300, buckets)
    assert wide[1] > wide[0] and tall == (wide[1], wide[0])
    assert nearest_bucket(500, 510, buckets) == (512, 512)


def test_rgba_and_palette_images_are_composited_on_white():
    from io import BytesIO

    from PIL import Image

    img = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    buf = BytesIO()
    img.save(buf, format="PNG")
    out = decode_image(buf.getvalue(), DatasetConfig(source="x", resolution=16, min_size=8))
    assert out.min() == 255


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^data\.resolution: must be a positive multiple of 16"):
        build(DatasetConfig, DatasetConfig(source="x"), overrides=["resolution=500"]).validate("data")
    with pytest.raises(ConfigError, match=r"data\.bad_share_limit"):
        DatasetConfig(source="x", bad_share_limit=1.5).validate("data")
    with pytest.raises(ConfigError, match=r"data\.source"):
        DatasetConfig().validate("data")
    with pytest.raises(ConfigError, match=r"crop: must be one of 'center', 'buckets'"):
        build(DatasetConfig, {"source": "x"}, overrides=["crop=square"])


@pytest.mark.s3
def test_filesystem_for_bridges_the_endpoint_from_the_environment(s3_env, tmp_path):
    bucket = s3_env.create_bucket("fsbridge")
    fs, path = filesystem_for(bucket + "/dir/obj.bin")
    assert path == "fsbridge/dir/obj.bin"
    with fs.open_output_stream(path) as f:
        f.write(b"payload")
    # s3fs (botocore) reads the same variables by itself: the object is there for it too
    import s3fs

    assert s3fs.S3FileSystem(use_listings_cache=False).cat(bucket + "/dir/obj.bin") == b"payload"
    local_fs, local_path = filesystem_for(str(tmp_path / "a"))
    assert local_path == str(tmp_path / "a") and local_fs.type_name == "local"
    with pytest.raises(DataSourceError, match="needs a bucket"):
        filesystem_for("s3:///nobucket")


def test_unreachable_s3_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with pytest.raises(DataSourceError, match=r"s3://nowhere/data: cannot reach the storage"):
        list(iter_decoded(DatasetConfig(source="s3://nowhere/data", format="parquet")))
