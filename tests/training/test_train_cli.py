"""The trainer: resume == uninterrupted, NaN fails loudly, init-from, configs, checkpoints."""
import json

import pytest
import torch

from tests.training.toy import events_table, random_sessions, toy_split, write_split
from training import checkpoint as ck
from training.config import ConfigError, resolve_config
from training.families.gru4rec import GRU4RecConfig, GRU4RecModel, dropout_masks, mask_streams
from training.train import main, train
from training.trainer import NonFiniteLoss

SMALL = ["n_sample=16", "batch_size=8", "layers=16", "num_threads=1"]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return toy_split(tmp_path_factory.mktemp("toy"), n_train=200, n_test=40)


def _weights(run):
    return ck.load_checkpoint(run)["state_dict"]


def test_resume_gives_the_same_result(split, tmp_path):
    full = tmp_path / "full"
    train("gru4rec", split, full, sets=SMALL + ["n_epochs=3"], show_progress=False)
    part = tmp_path / "part"
    train("gru4rec", split, part, sets=SMALL + ["n_epochs=1"], show_progress=False)
    # "interrupted" after epoch 1; resume asking for the full 3 epochs
    assert main(["--model", "gru4rec", "--data", str(split), "--out", str(part), "--resume",
                 "--set", "n_epochs=3", "--no-progress"]) == 0
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = json.loads((full / "history.json").read_text())["epochs"]
    hb = json.loads((part / "history.json").read_text())["epochs"]
    assert [e["loss"] for e in ha] == [e["loss"] for e in hb]
    assert len(list((part / "checkpoints").glob("epoch_*.pt"))) == 3


def test_nan_loss_fails_naming_epoch_and_step(split, tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"epoch 0 step \d+"):
        train("gru4rec", split, tmp_path / "nan", show_progress=False,
              sets=SMALL + ["n_epochs=1", "learning_rate=1e30", "momentum=0.9", "optimizer=adam"])


def test_checkpoint_is_plain_tensors_config_and_item_index(split, tmp_path):
    """Checklist 11: no pickled model; state_dict + resolved config + item index."""
    run = tmp_path / "r"
    train("gru4rec", split, run, sets=SMALL + ["n_epochs=1"], show_progress=False)
    raw = torch.load(run / "model.pt", weights_only=True)  # refuses arbitrary pickles
    assert not any(isinstance(v, torch.nn.Module) for v in raw.values())
    assert raw["config"]["layers"] == [16] and raw["config"]["batch_size"] == 8
    assert raw["item_index"]["item_id"].dtype == torch.int64
    cfg = json.loads((run / "config.json").read_text())
    assert cfg == raw["config"]
    assert (run / "item_index.parquet").exists()
    hist = json.loads((run / "history.json").read_text())
    assert hist["epochs"][0]["events_per_s"] > 0 and "loss" in hist["epochs"][0]


def test_init_from_keeps_item_index_and_weights(split, tmp_path):
    pre = tmp_path / "pre"
    train("gru4rec", split, pre, sets=SMALL + ["n_epochs=1"], show_progress=False)
    ft = tmp_path / "ft"
    # fine-tune on the most recent quarter (Tan M2); with 0 epochs the weights are the pre-trained ones
    train("gru4rec", split, ft, init_from=str(pre), sets=["train_table=train_recent_4", "n_epochs=0"],
          show_progress=False)
    a, b = ck.load_checkpoint(pre), ck.load_checkpoint(ft)
    assert torch.equal(a["item_index"]["item_id"], b["item_index"]["item_id"])
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k])
    assert b["config"]["train_table"] == "train_recent_4" and b["config"]["layers"] == [16]
    train("gru4rec", split, tmp_path / "ft2", init_from=str(pre / "model.pt"),
          sets=["train_table=train_recent_4", "n_epochs=1"], show_progress=False)
    c = ck.load_checkpoint(tmp_path / "ft2")
    assert not torch.equal(a["state_dict"]["Wy"], c["state_dict"]["Wy"])


def test_config_file_and_set_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("loss: bpr-max\nfinal_act: elu-0.5\nbpreg: 1.95\nlayers: [64, 32]\n")
    cfg = resolve_config("gru4rec", None, f, ["bpreg=2", "dropout_hidden=0.1", "nesterov=true"])
    assert (cfg.loss, cfg.final_act, cfg.bpreg, cfg.layers) == ("bpr-max", "elu-0.5", 2.0, [64, 32])
    assert cfg.dropout_hidden == 0.1 and cfg.nesterov is True
    assert resolve_config("gru4rec", sets=["layers=100/100"]).layers == [100, 100]
    with pytest.raises(ConfigError, match="unknown config key 'lr'"):
        resolve_config("gru4rec", sets=["lr=0.1"])
    with pytest.raises(ConfigError, match="not an int"):
        resolve_config("gru4rec", sets=["batch_size=__import__('os')"])
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"model": "gru4rec", "n_sample": 0}))
    assert resolve_config("gru4rec", config_file=j).n_sample == 0


def test_dropout_probabilities_are_drop_not_keep_and_separate():
    """Checklist 4: dropout_hidden=0.4 drops ~40%; embedding dropout is separate (0 -> no mask)."""
    cfg = GRU4RecConfig(batch_size=64, layers=[50], dropout_hidden=0.4, dropout_embed=0.0)
    cpu = torch.device("cpu")
    emb, hid = dropout_masks(cfg, GRU4RecModel(10, cfg), 100, 64, mask_streams(cfg, GRU4RecModel(10, cfg), 0), cpu)
    assert emb is None
    dropped = (hid[0] == 0).float().mean().item()
    assert 0.38 < dropped < 0.42
    assert hid[0].max().item() == pytest.approx(1 / 0.6)
    cfg2 = GRU4RecConfig(batch_size=64, layers=[50], dropout_hidden=0.0, dropout_embed=0.25)
    emb, hid = dropout_masks(cfg2, GRU4RecModel(10, cfg2), 100, 64, mask_streams(cfg2, GRU4RecModel(10, cfg2), 0), cpu)
    assert hid[0] is None and 0.23 < (emb == 0).float().mean().item() < 0.27


def test_sizes_not_hard_coded(split, tmp_path):
    """Checklist 5: odd sizes and every embedding mode train (default path for each)."""
    for sets in (["layers=7/5", "batch_size=3", "n_sample=5", "embedding=separate", "embedding_dim=6"],
                 ["layers=9", "batch_size=5", "n_sample=0", "embedding=onehot", "loss=top1-max",
                  "final_act=linear", "session_order=random"]):
        res = train("gru4rec", split, tmp_path / sets[0].replace("/", "_"), show_progress=False,
                    sets=sets + ["n_epochs=1", "num_threads=1"])
        assert res["history"][0]["events"] > 0


@pytest.mark.parametrize("path", ["torch", "native", "manual"])
def test_no_all_item_scores_in_training(tmp_path, path, monkeypatch):
    """Checklist 2: no training path ever computes a [batch, n_items] score matrix. Every
    tensor torch produces (TorchFunctionMode sees the autograd path's and the hand-written
    path's torch ops) and every product handed to MKL from Python (MatmulJobs, the C path) is
    checked against the size of the full score matrix. Breaking it (e.g. scoring with
    ``all_scores`` and slicing the sampled columns) fails here. The whole-chunk C path
    (rnn_train_chunk) is not visible from Python; its scratch holds (2B + n_sample) x B scores
    (kernels.c), and it is tested step-for-step equal to the per-step path."""
    from torch.overrides import TorchFunctionMode

    from training import native

    n_items, B = 3000, 64
    sessions = random_sessions(400, n_items, 7)
    root = write_split(tmp_path / "big", {"train_full": events_table(sessions)})
    full = B * n_items // 2  # the smallest full score matrix is [B, n_items]; params are [n_items, 4]
    big = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and not t.is_sparse and t.numel() >= full:
                    big.append((getattr(func, "__name__", str(func)), tuple(t.shape)))
            return out

    real_run = native.MatmulJobs.run

    def run(self, jobs, split):
        for j in jobs:
            if j[2] * j[3] >= full:
                big.append(("sgemm", (j[2], j[3])))
        return real_run(self, jobs, split)

    monkeypatch.setattr(native.MatmulJobs, "run", run)
    with Watch():
        res = train("gru4rec", root, tmp_path / "r", show_progress=False,
                    sets=["layers=4", f"batch_size={B}", "n_sample=16", "n_epochs=1", "num_threads=1",
                          f"train_path={path}"])
    assert res["train_path"] == path and res["history"][0]["events"] > 1000
    assert big == []
