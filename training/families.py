"""Model families: how each one trains an epoch, saves its weights and becomes a Scorer.

A family is a class with::

    Family(cfg, index, data, train_support, device)   # build (fresh weights)
    .init_weights(seed) / .load_weights(state_dict)   # fresh run / --resume, --init-from
    .run_epoch(epoch, progress) -> {"loss", "events", "seconds", "events_per_s"}
    .state_dict() / .optimizer_state() / .load_optimizer_state(d)
    Family.scorer(ckpt, device) -> evaluation.scorer.Scorer       (static)

``training.train`` (the one trainer) only talks to this; later families
(HRNN, user-based GRU, Tan, Villatel, baselines) add a class and a FAMILIES entry.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from evaluation.scorer import GRU4RecScorer, PopScorer
from training.batching import SampleStore, session_parallel_schedule
from training.config import GRU4RecConfig, PopConfig, config_from_dict
from training.data import ItemIndex, SessionData
from training.gru4rec import FastStep, GRU4RecModel


class NonFiniteLoss(FloatingPointError):
    """Training produced NaN/inf; the message names the epoch and step."""


class GRU4RecFamily:
    #: steps between host syncs (NaN check + progress); per-step .item() would stall the loop
    CHECK_EVERY = 256

    def __init__(self, cfg: GRU4RecConfig, index: ItemIndex, data: SessionData,
                 train_support: np.ndarray, device: torch.device):
        self.cfg = cfg
        self.index = index
        self.data = data
        self.device = device
        self.model = GRU4RecModel(index.n_items, cfg).to(device)
        self.train_support = train_support
        self.step = None

    def init_weights(self, seed: int) -> None:
        self.model.reset_parameters(torch.Generator().manual_seed(seed))
        self.step = FastStep(self.model, self.cfg, self.train_support, self.device)

    def load_weights(self, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)
        self.step = FastStep(self.model, self.cfg, self.train_support, self.device)

    def state_dict(self) -> dict:
        return {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}

    def optimizer_state(self) -> dict:
        return self.step.optimizer_state()

    def load_optimizer_state(self, d: dict) -> None:
        self.step.load_optimizer_state(d)

    def _masks(self, n_steps: int, B: int, gen: torch.Generator) -> tuple:
        """Dropout masks for a chunk of steps, drawn at once ([n_steps, B, H] each)."""
        c, m = self.cfg, self.model
        emb = None
        if c.dropout_embed > 0 and m.embedding != "onehot":
            d = m.Wy.shape[1] if m.embedding == "tied" else m.E.shape[1]
            emb = (torch.rand(n_steps, B, d, generator=gen) >= c.dropout_embed).float().mul_(
                1 / (1 - c.dropout_embed)).to(self.device)
        hid = []
        for i, h in enumerate(m.layers):
            # official one-hot quirk: the first layer plays the embedding, so it takes dropout_embed
            p = c.dropout_embed if (i == 0 and m.embedding == "onehot") else c.dropout_hidden
            hid.append((torch.rand(n_steps, B, h, generator=gen) >= p).float().mul_(1 / (1 - p)).to(
                self.device) if p > 0 else None)
        return emb, hid

    def run_epoch(self, epoch: int, progress=None) -> dict:
        c, dev = self.cfg, self.device
        B = c.batch_size
        # one generator per (seed, epoch): --resume reproduces an uninterrupted run exactly
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + epoch)
        order = self.data.order(c.session_order, np.random.default_rng([c.seed, epoch]))
        sch = session_parallel_schedule(self.data.items, self.data.offsets, order, B)
        X = torch.from_numpy(sch.inputs).to(dev)
        Y = torch.from_numpy(sch.targets).to(dev)
        keep = torch.from_numpy(~sch.reset).to(torch.float32).unsqueeze(-1).to(dev)
        n_valid = sch.n_valid
        store = SampleStore(self.train_support, c.n_sample, c.sample_alpha,
                            min(c.sample_store_size, max(1, sch.n_steps) * c.n_sample), gen, dev) if c.n_sample > 0 else None
        state = self.model.init_state(B, dev)
        losses = torch.zeros(sch.n_steps, device=dev)
        t0 = time.perf_counter()
        chunk = self.CHECK_EVERY
        done_events = 0
        for c0 in range(0, sch.n_steps, chunk):
            c1 = min(sch.n_steps, c0 + chunk)
            samples = store.take(c1 - c0) if store is not None else None
            emb_m, hid_m = self._masks(c1 - c0, B, gen)
            t_next = c0
            if self.step.chunk is not None and B + c.n_sample >= 2:
                # the full-batch steps of this chunk in one C call (the tail steps, where the
                # batch shrinks, stay on the per-step path below)
                full = n_valid[c0:c1] == B
                f1 = c0 + (int(np.argmin(full)) if not full.all() else c1 - c0)
                if f1 > c0:
                    k = f1 - c0
                    done = self.step.run_chunk(
                        X[c0:f1], Y[c0:f1], samples[:k] if samples is not None else None, keep[c0:f1],
                        emb_m[:k] if emb_m is not None else None,
                        [m[:k] if m is not None else None for m in hid_m], state, losses[c0:f1])
                    t_next = f1 if done == k else c1  # stopped at a non-finite loss: report it
            for t in range(t_next, c1):
                k = t - c0
                M = int(n_valid[t])
                if M == B:
                    for h in state:
                        h.mul_(keep[t])
                    x, yp = X[t], Y[t]
                    masks = {"embed": emb_m[k] if emb_m is not None else None,
                             "hidden": [m[k] if m is not None else None for m in hid_m]}
                    sub = state
                else:  # tail: sessions ran out, the batch shrinks to the active slots
                    rows = torch.nonzero(Y[t] >= 0).squeeze(1)
                    sub = [h.index_select(0, rows).mul_(keep[t][rows]) for h in state]
                    x, yp = X[t][rows], Y[t][rows]
                    masks = {"embed": emb_m[k][rows] if emb_m is not None else None,
                             "hidden": [m[k][rows] if m is not None else None for m in hid_m]}
                y = torch.cat([yp, samples[k]]) if samples is not None else yp
                if y.shape[0] < 2:  # a single row with no negatives cannot be ranked
                    continue
                losses[t] = self.step(x, y, sub, masks)
                if M < B:
                    for i, h in enumerate(state):
                        h.index_copy_(0, rows, sub[i])
            # host sync once per chunk: fail loudly on NaN/inf naming epoch and step
            bad = ~torch.isfinite(losses[c0:c1])
            if bool(bad.any()):
                first = c0 + int(torch.nonzero(bad)[0, 0])
                raise NonFiniteLoss(
                    f"non-finite loss {float(losses[first])} at epoch {epoch} step {first} "
                    f"(of {sch.n_steps}); lower learning_rate or check the data")
            done_events += int(n_valid[c0:c1].sum())
            if progress is not None:
                el = time.perf_counter() - t0
                progress(c1 - c0, float(losses[c0:c1].mean()), done_events / max(el, 1e-9))
        secs = time.perf_counter() - t0
        nv = torch.from_numpy(n_valid.astype(np.float32)).to(dev)
        loss = float((losses * nv).sum() / nv.sum()) if sch.n_steps else float("nan")
        return {"epoch": epoch, "loss": loss, "events": sch.n_events, "steps": sch.n_steps,
                "seconds": secs, "events_per_s": sch.n_events / max(secs, 1e-9)}

    @staticmethod
    def scorer(ckpt: dict, device: torch.device):
        cfg = config_from_dict(ckpt["config"])
        n_items = int(ckpt["item_index"]["item_id"].shape[0])
        model = GRU4RecModel(n_items, cfg)
        model.load_state_dict(ckpt["state_dict"])
        return GRU4RecScorer(model, device, mixed_precision=cfg.eval_mixed_precision)


class PopFamily:
    """POP baseline: 'training' = counting item support in the training table."""

    def __init__(self, cfg: PopConfig, index: ItemIndex, data: SessionData,
                 train_support: np.ndarray, device: torch.device):
        self.cfg = cfg
        self.support = torch.from_numpy(train_support.astype(np.int64))

    def init_weights(self, seed: int) -> None:
        pass

    def load_weights(self, state_dict: dict) -> None:
        pass  # POP is recomputed from the (new) training table

    def state_dict(self) -> dict:
        return {"support": self.support.clone()}

    def optimizer_state(self) -> dict:
        return {}

    def load_optimizer_state(self, d: dict) -> None:
        pass

    def run_epoch(self, epoch: int, progress=None) -> dict:
        return {"epoch": epoch, "loss": 0.0, "events": 0, "steps": 0, "seconds": 0.0, "events_per_s": 0.0}

    @staticmethod
    def scorer(ckpt: dict, device: torch.device):
        return PopScorer(ckpt["state_dict"]["support"], device)


FAMILIES = {"gru4rec": GRU4RecFamily, "pop": PopFamily}


def load_scorer(ckpt: dict, device: torch.device):
    """Checkpoint -> Scorer for the evaluation loop (any family)."""
    name = ckpt["model"]
    if name not in FAMILIES:
        raise ValueError(f"checkpoint is of unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name].scorer(ckpt, device)
