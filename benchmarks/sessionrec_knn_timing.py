"""Time session-rec's OWN V-SKNN / Item-KNN on one of this project's splits (for the speed
ratio in benchmarks/README_baselines.md). session-rec is never copied into this repository:
clone it into a scratch folder and point $SESSION_REC at it::

    git clone https://github.com/rn5l/session-rec /tmp/sr && git -C /tmp/sr checkout 5dcd583
    pip install --target /tmp/sr_deps pympler        # its vsknn imports it
    SESSION_REC=/tmp/sr SESSION_REC_DEPS=/tmp/sr_deps python -m benchmarks.sessionrec_knn_timing \
        /tmp/rnnrec-bench/prep-1M-seed0/splits/time vsknn 2000

Fits on ``train_full`` (pandas SessionId/ItemId/Time, seconds), then calls ``predict_next``
for the first N test events in session order (all training items as candidates, as its
evaluation does), timing them, and extrapolates to every test prediction. Prints JSON.
"""
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.environ.get("SESSION_REC", "/tmp/sr"))
sys.path.append(os.environ.get("SESSION_REC_DEPS", "/tmp/sr_deps"))
import numpy as np
import pyarrow.dataset as ds
np.in1d = np.isin  # numpy 2 removed in1d (session-rec predates it): same function

split, model, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
def load(t):
    d = ds.dataset(f"{split}/{t}", format="parquet").to_table(columns=["session_id", "item_id", "ts"]).to_pandas()
    d["Time"] = d.ts.dt.tz_convert(None).astype("datetime64[ns]").astype("int64") / 1e9  # Unix seconds
    d = d.rename(columns={"session_id": "SessionId", "item_id": "ItemId"}).sort_values(["SessionId", "Time"], kind="stable")
    return d[["SessionId", "ItemId", "Time"]]
tr, te = load("train_full"), load("test")
te = te[te.ItemId.isin(tr.ItemId.unique())]
te = te[te.groupby("SessionId").ItemId.transform("size") >= 2]
if model == "vsknn":
    from algorithms.knn.vsknn import VMContextKNN
    m = VMContextKNN(k=100, sample_size=500, weighting="div")
else:
    from algorithms.knn.iknn import ItemKNN
    m = ItemKNN(n_sims=100, lmbd=20, alpha=0.5)
t0 = time.perf_counter(); m.fit(tr); fit = time.perf_counter() - t0
items = tr.ItemId.unique()
n_pred_total = int(len(te) - te.SessionId.nunique())
t0 = time.perf_counter(); n = 0; prev = None
for sid, it, ts in te.itertuples(index=False):
    if sid != prev:
        prev = sid; pos = 0
    else:
        pos += 1
    # session-rec's evaluation predicts after every event except the last of a session
    s = m.predict_next(sid, it, items, timestamp=ts)
    n += 1
    if n >= N:
        break
pred = time.perf_counter() - t0
print(json.dumps({"model": model, "train_events": len(tr), "n_items": len(items), "fit_s": round(fit, 1),
                  "timed_predictions": n, "predict_s": round(pred, 1), "per_prediction_ms": round(1000 * pred / n, 2),
                  "test_predictions": n_pred_total, "extrapolated_test_day_s": round(pred / n * n_pred_total),
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))
