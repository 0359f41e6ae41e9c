"""The Spark job and the independent pandas reference agree row for row on generated data."""
from __future__ import annotations

import json

from spark_jobs import generate, reference_pandas as ref
from spark_jobs.preprocess import PreprocessConfig, run


def test_spark_equals_pandas_reference_on_generated_clickstream(spark, tmp_path):
    raw = tmp_path / "raw"
    generate.write(raw, 20_000, n_days=4, seed=3, progress=False)
    opts = dict(min_item_support=5, min_session_length=2, test_days=1, remove_repeats=True,
                recent_fractions=(16, 4, 1))
    spark_out = tmp_path / "spark"
    m = run(PreprocessConfig(input=[str(raw)], format="synthetic", split="time", out=str(spark_out),
                             **{**opts, "recent_fractions": list(opts["recent_fractions"])}), spark)
    ref_out = tmp_path / "ref"
    ref.preprocess([str(raw)], "synthetic", ref_out, **opts)
    diff = ref.compare_outputs(spark_out, ref_out)
    assert len(diff) >= 8  # events + train/valid/test/train_full + 3 recent tables
    assert all(v is None for v in diff.values()), diff
    # the filters really did something, over more than one round, and the counts agree
    with open(ref_out / "manifest.json") as f:
        rm = json.load(f)
    assert m["events"]["events"] < m["steps"][0]["events"]
    assert len({s["round"] for s in m["steps"] if "round" in s}) >= 2
    assert m["events"]["events"] == rm["events"]["events"]
    assert m["events"]["sessions"] == rm["events"]["sessions"]
