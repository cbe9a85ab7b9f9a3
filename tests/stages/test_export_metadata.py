"""A stage's export metadata reads its settings through `recorded`: a published snapshot's settings come from
elsewhere (an older sdxlpipe, another tool), so a field it lacks or holds with another JSON type is the default."""

from __future__ import annotations

from sdxlpipe.stages import bucket, caption, recorded


def test_a_snapshots_settings_over_the_defaults_and_a_value_of_another_type_is_the_default():
    settings = recorded(bucket, {"resolution": "1024; rm -rf", "min_side": 32, "no_upscale": 1, "not_a_field": 5})
    defaults = bucket.Params()
    assert settings["resolution"] == defaults.resolution, "a string where the default is a number"
    assert settings["no_upscale"] == defaults.no_upscale, "1 is not a bool"
    assert settings["min_side"] == 32 and "not_a_field" not in settings
    assert recorded(caption, None)["keep_tokens"] == caption.Params().keep_tokens
    assert bucket.export_metadata(settings, None, None)["ss_resolution"] == f"({defaults.resolution}, {defaults.resolution})"
